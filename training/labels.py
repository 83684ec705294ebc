"""Token labels from a minimal edit: diff the token ids of the rejected and the edited response.

Tokens of the rejected response that the edit deletes or replaces are NEGATIVE; tokens of the
edited response that it inserts or replaces are POSITIVE; all others are NEUTRAL.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import SequenceMatcher

NEGATIVE, NEUTRAL, POSITIVE = 0, 1, 2
LABEL_NAMES = ("negative", "neutral", "positive")  # index = label id, as in the model's config
IGNORE = -100  # the loss skips this label (prompt tokens, padding)


def edit_labels(rejected: Sequence[int], edited: Sequence[int]) -> tuple[list[int], list[int]]:
    """Return (labels of the rejected tokens, labels of the edited tokens)."""
    rejected_labels = [NEUTRAL] * len(rejected)
    edited_labels = [NEUTRAL] * len(edited)
    # autojunk would treat frequent tokens (spaces, punctuation) as junk on long responses.
    matcher = SequenceMatcher(a=rejected, b=edited, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op in ("replace", "delete"):
            rejected_labels[i1:i2] = [NEGATIVE] * (i2 - i1)
        if op in ("replace", "insert"):
            edited_labels[j1:j2] = [POSITIVE] * (j2 - j1)
    return rejected_labels, edited_labels
