"""tokenrm.core.segments: which characters of a response show which reward (hand-computed)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from tokenrm.core.segments import Segment, reward_segments

RESPONSE = "Ana lives in Lima."
OFFSETS = [[0, 3], [3, 9], [9, 12], [12, 17], [17, 18]]
REWARDS = [0.02, -0.91, 0.30, -0.20, 0.75]


def _rounded(pieces: list[Segment]) -> list[tuple[int, int, float | None]]:
    return [(a, b, None if r is None else round(r, 9)) for a, b, r in pieces]


@pytest.mark.parametrize(("response", "offsets", "rewards", "want"), [
    # Tokens tile the text: one piece per token.
    (RESPONSE, OFFSETS, REWARDS,
     [(0, 3, 0.02), (3, 9, -0.91), (9, 12, 0.30), (12, 17, -0.20), (17, 18, 0.75)]),
    # Gaps the tokenizer does not cover (spaces, a tab, a trailing newline) carry None.
    ("Ana lives\tin Lima.\n", [[0, 3], [4, 9], [10, 12], [13, 18]], [-0.5, 0.5, -0.1, 0.2],
     [(0, 3, -0.5), (3, 4, None), (4, 9, 0.5), (9, 10, None), (10, 12, -0.1), (12, 13, None),
      (13, 18, 0.2), (18, 19, None)]),
    # Two byte-level tokens of "Ł" pool into one piece (0.1 - 0.6); the zero-width token at 4
    # joins the next token; the overlap [3, 7) is cut to [4, 7) (-0.9 + 0.3).
    ("Łódź ok", [[0, 1], [0, 1], [1, 4], [4, 4], [3, 7]], [0.1, -0.6, 0.2, 0.3, -0.9],
     [(0, 1, -0.5), (1, 4, 0.2), (4, 7, -0.6)]),
    # Multi-line text; offsets past the end are cut at the end.
    ("one\ntwo\n", [[0, 3], [3, 7], [7, 99]], [1.0, -1.0, 0.0],
     [(0, 3, 1.0), (3, 7, -1.0), (7, 8, 0.0)]),
    # A zero-width token with no token after it joins the last piece shown.
    ("ab", [[0, 1], [1, 2], [2, 2]], [0.1, 0.2, 0.4], [(0, 1, 0.1), (1, 2, 0.6)]),
    # A lone space token trimmed to [3, 3) belongs with "O".
    ("in Oslo", [[0, 2], [3, 3], [3, 4], [4, 7]], [0.0, -0.6, 0.0, 0.0],
     [(0, 2, 0.0), (2, 3, None), (3, 4, -0.6), (4, 7, 0.0)]),
    # No tokens: the whole text is one gap; no text: no pieces.
    ("x", [], [], [(0, 1, None)]),
    ("", [], [], []),
    # No token has a character: nothing to attach the reward to.
    ("ab", [[0, 0]], [0.5], [(0, 2, None)]),
])
def test_hand_computed_segments(response: str, offsets: list[list[int]], rewards: list[float],
                                want: list[tuple[int, int, float | None]]) -> None:
    pieces = reward_segments(len(response), offsets, rewards)
    assert _rounded(pieces) == want
    assert all(isinstance(p, Segment) for p in pieces)


# Gaps, pooled and zero-width tokens, overlaps (also drawn by tests/test_score_cli.py).
COVERAGE_CASES = [
    (RESPONSE, OFFSETS, REWARDS),
    ("Ana lives\tin Lima.\n", [[0, 3], [4, 9], [10, 12], [13, 18]], [-0.5, 0.5, -0.1, 0.2]),
    ("Łódź ok", [[0, 1], [0, 1], [1, 4], [4, 4], [3, 7]], [0.1, -0.6, 0.2, 0.3, -0.9]),
    ("one\ntwo\n", [[0, 3], [3, 7], [7, 99]], [1.0, -1.0, 0.0]),
    ("x", [], []),
    ("abcdef", [[2, 2], [4, 6], [0, 3], [3, 3], [5, 9]], [0.5, -0.25, 1.0, 2.0, -4.0]),
]


@pytest.mark.parametrize(("response", "offsets", "rewards"), COVERAGE_CASES)
def test_every_character_is_covered_once_in_order_and_rewards_are_kept(
        response: str, offsets: list[list[int]], rewards: list[float]) -> None:
    pieces = reward_segments(len(response), offsets, rewards)
    assert "".join(response[a:b] for a, b, _ in pieces) == response
    assert all(a < b for a, b, _ in pieces)
    for (_, end), (start, _) in itertools.pairwise((a, b) for a, b, _ in pieces):
        assert end == start
    shown = sum(r for _, _, r in pieces if r is not None)
    assert shown == pytest.approx(sum(rewards))


def test_mismatched_offsets_and_rewards_are_refused() -> None:
    with pytest.raises(ValueError, match="2 offsets but 1 rewards"):
        reward_segments(2, [[0, 1], [1, 2]], [0.5])


def test_the_module_imports_nothing_but_the_standard_library() -> None:
    check = ("import sys; before = set(sys.modules); import tokenrm.core.segments; "
             "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
             "assert new <= {'tokenrm'} | set(sys.stdlib_module_names), new; "
             "assert not [m for m in set(sys.modules) - before if m.startswith('tokenrm.') "
             "and m not in ('tokenrm.core', 'tokenrm.core.segments')]")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
