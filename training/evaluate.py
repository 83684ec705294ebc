"""Metrics of a token reward model on held-out pairs (what `tokenrm eval-rm` prints)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenrm.core.scoring import Scored
from tokenrm.training.data import ErrorSpan, Pair
from tokenrm.training.labels import NEGATIVE, POSITIVE, edit_labels

FLAG_BELOW = -0.5  # a token is flagged as an error when its reward is below this


def _auroc(labels: list[bool], scores: list[float]) -> float | None:
    from sklearn.metrics import roc_auc_score  # the [train] extra: not needed to serve or run PPO

    return float(roc_auc_score(labels, scores)) if 0 < sum(labels) < len(labels) else None


def _f1(gold: int, predicted: int, hits: int) -> float:
    return 2 * hits / (gold + predicted) if gold + predicted else 1.0


def _overlaps(offset: tuple[int, int], spans: Sequence[ErrorSpan]) -> bool:
    start, end = offset[0], max(offset[1], offset[0] + 1)
    return any(start < s.end and end > s.start for s in spans)


def metrics(pairs: Sequence[Pair], rejected: Sequence[Scored], edited: Sequence[Scored]
            ) -> dict[str, float | int | None]:
    """Token AUROC, pairwise accuracy and localisation F1 from scored pairs.

    - neg_auroc: negative tokens vs the rest, in rejected responses (score: -reward);
    - pos_auroc: positive tokens vs the rest, in edited responses (score: reward);
    - token_auroc: both sets pooled, each token scored as above;
    - pairwise_accuracy: share of pairs whose edited total reward beats the rejected one;
    - localisation_f1: tokens flagged (reward < FLAG_BELOW) vs tokens the oracle's error spans
      cover, in rejected responses of pairs that carry oracle spans.
    """
    neg_y: list[bool] = []
    neg_s: list[float] = []
    pos_y: list[bool] = []
    pos_s: list[float] = []
    wins = 0
    gold = predicted = hits = 0
    with_spans = 0
    for pair, rej, edi in zip(pairs, rejected, edited, strict=True):
        rej_labels, edi_labels = edit_labels(rej.token_ids, edi.token_ids)
        neg_y += [lab == NEGATIVE for lab in rej_labels]
        neg_s += (-rej.rewards).tolist()
        pos_y += [lab == POSITIVE for lab in edi_labels]
        pos_s += edi.rewards.tolist()
        wins += float(edi.rewards.sum()) > float(rej.rewards.sum())
        if pair.errors:
            with_spans += 1
            for offset, reward in zip(rej.offsets, rej.rewards, strict=True):
                is_gold, flagged = _overlaps(offset, pair.errors), reward < FLAG_BELOW
                gold += is_gold
                predicted += flagged
                hits += is_gold and flagged
    return {
        "pairs": len(pairs),
        "token_auroc": _auroc(neg_y + pos_y, neg_s + pos_s),
        "neg_auroc": _auroc(neg_y, neg_s),
        "pos_auroc": _auroc(pos_y, pos_s),
        "pairwise_accuracy": wins / len(pairs) if pairs else None,
        "localisation_f1": _f1(gold, predicted, hits) if with_spans else None,
        "localisation_precision": hits / predicted if predicted else None,
        "localisation_recall": hits / gold if gold else None,
    }


ScoreTexts = Callable[[Sequence[tuple[str, str]]], list[Scored]]
"""Rewards of (prompt, response) items: a model in training, or a served checkpoint."""


def evaluate(score: ScoreTexts, pairs: Sequence[Pair], token_level: bool = True
             ) -> dict[str, float | int | None]:
    """Score both responses of every pair and compute `metrics`; for a sequence-level model
    (`token_level` False: one score per response) only the pair count and pairwise accuracy."""
    rejected = score([(p.prompt, p.rejected) for p in pairs])
    edited = score([(p.prompt, p.edited) for p in pairs])
    found = metrics(pairs, rejected, edited)
    return found if token_level else {k: found[k] for k in ("pairs", "pairwise_accuracy")}
