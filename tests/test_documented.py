"""Documented behaviour that had no test (issue 19, item 5), part 1: `eval-rm`'s metrics on a
case computed by hand. The client's documented behaviour is in test_documented_client.py, the
server's in test_documented_server.py."""

from __future__ import annotations

import numpy as np
import pytest

from tokenrm.core.scoring import Scored
from tokenrm.training.data import ErrorSpan, Pair
from tokenrm.training.evaluate import metrics


def _scored(rewards: list[float], token_ids: list[int]) -> Scored:
    """Rewards of a response whose tokens are two-character words after the first: offsets
    (0, 2), (2, 5), (5, 8), ... ("aa bb cc"); rewards are float32, as the server's are."""
    offsets = [(0, 2)] + [(3 * i - 1, 3 * i + 2) for i in range(1, len(token_ids))]
    return Scored(np.array(rewards, dtype=np.float32), offsets, token_ids)


# Three pairs. Labels come from the diff of the token ids (README "Labels"):
#   A: rejected [1, 2, 3, 4] -> edited [1, 2, 9, 4]: token 2 replaced (negative / positive);
#      oracle error at characters 6-8 of "aa bb cc dd": rejected token 2 (5, 8) only.
#   B: rejected [5, 6, 7] -> edited [5, 6]: token 2 deleted (negative; no positive);
#      oracle error at characters 3-8 of "xx yy zz": rejected tokens 1 (2, 5) and 2 (5, 8).
#   C: rejected [1, 2] -> edited [1, 3, 2]: token 1 inserted (positive; no negative); no
#      oracle spans, so its flagged token (-0.6) must not count for localisation.
PAIRS = [Pair("p", "aa bb cc dd", "aa bb zz dd", errors=(ErrorSpan("wrong_fact", 6, 8),)),
         Pair("p", "xx yy zz", "xx yy", errors=(ErrorSpan("rude", 3, 8),)),
         Pair("p", "aa bb", "aa qq bb")]
REJECTED = [_scored([0.1, -0.7, -0.9, 0.0], [1, 2, 3, 4]),
            _scored([-0.8, 0.0, -0.7], [5, 6, 7]),
            _scored([-0.6, 1.0], [1, 2])]
EDITED = [_scored([0.1, 0.0, 0.8, 0.2], [1, 2, 9, 4]),
          _scored([0.0, 0.1], [5, 6]),
          _scored([0.0, 0.05, 0.2], [1, 3, 2])]


def test_eval_rm_metrics_equal_a_hand_computed_case() -> None:
    got = metrics(PAIRS, REJECTED, EDITED)

    # neg_auroc: rejected tokens scored by -reward. Negatives (label true): A2 0.9, B2 0.7.
    # The rest: -0.1, 0.7, 0.0 (A), 0.8, 0.0 (B), 0.6, -1.0 (C): 7 of them.
    # 0.9 beats all 7; 0.7 beats 5, ties 1 (A1, counted 1/2), loses to 0.8: (7 + 5.5) / 14.
    assert got["neg_auroc"] == pytest.approx(12.5 / 14)
    # pos_auroc: edited tokens scored by reward. Positives: A2 0.8, C1 0.05.
    # The rest: 0.1, 0.0, 0.2 (A), 0.0, 0.1 (B), 0.0, 0.2 (C).
    # 0.8 beats all 7; 0.05 beats the three 0.0: (7 + 3) / 14.
    assert got["pos_auroc"] == pytest.approx(10 / 14)
    # token_auroc: both pooled, 4 positives (0.9, 0.7, 0.8, 0.05) against 14 others:
    # 0.9 beats 14; 0.8 beats 13, ties 1 (B0's -(-0.8)); 0.7 beats 12, ties 1; 0.05 beats 7
    # (-1.0, -0.1 and five 0.0): (14 + 13.5 + 12.5 + 7) / 56.
    assert got["token_auroc"] == pytest.approx(47 / 56)
    # Totals, edited vs rejected: A 1.1 > -1.5, B 0.1 > -1.5, C 0.25 < 0.4.
    assert got["pairwise_accuracy"] == pytest.approx(2 / 3)
    # Localisation, pairs with oracle spans only (A, B); flagged: reward < -0.5.
    # A: gold {2}, flagged {1, 2}; B: gold {1, 2}, flagged {0, 2}. Gold 3, flagged 4, hits 2.
    assert got["localisation_precision"] == pytest.approx(2 / 4)
    assert got["localisation_recall"] == pytest.approx(2 / 3)
    assert got["localisation_f1"] == pytest.approx(2 * 2 / (3 + 4))
    assert got["pairs"] == 3


def test_localisation_is_none_without_oracle_spans_and_a_tie_is_not_a_win() -> None:
    """A pair whose edited total only equals the rejected one does not count as won; with no
    oracle spans in the set there is no localisation figure at all (not a perfect one)."""
    pair = Pair("p", "aa bb", "aa cc")
    rejected, edited = _scored([0.25, -0.5], [1, 2]), _scored([-0.5, 0.25], [1, 3])
    got = metrics([pair], [rejected], [edited])
    assert got["pairwise_accuracy"] == 0.0
    assert (got["localisation_f1"], got["localisation_precision"],
            got["localisation_recall"]) == (None, None, None)
    # One negative (rejected token 1, score 0.5) against one other (-0.25): it wins.
    assert got["neg_auroc"] == 1.0
    # One positive (edited token 1, 0.25) against one other (-0.5): it wins.
    assert got["pos_auroc"] == 1.0
