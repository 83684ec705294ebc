"""Choosing the next batch: pure functions over the waiting rows' lengths."""

from __future__ import annotations

import math
from collections.abc import Sequence


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a right-padded batch of these rows costs: rows x the longest."""
    return len(lengths) * max(lengths, default=0)


def pick_batch(lengths: Sequence[int], max_tokens: int, max_rows: int,
               overhead_tokens: float = math.inf) -> list[int]:
    """Indices (into `lengths`, oldest first) of the rows to run next.

    The oldest row always goes, so nothing starves, even a row longer than the budget. Then
    rows closest in length to it join while the padded batch stays within `max_tokens` and
    `max_rows`, and while a row does not lower the batch's real tokens per unit of cost: a
    forward costs `overhead_tokens` (its fixed cost, in tokens of compute) plus its padded
    tokens. So short rows batch freely, while long rows of unlike lengths, whose padding
    would cost more than the overhead they share, wait for their own batch. With an infinite
    overhead only the budgets limit a batch.
    """
    if not lengths:
        return []
    anchor = lengths[0]
    chosen, longest, real = [0], anchor, anchor
    by_closeness = sorted(range(1, len(lengths)), key=lambda i: (abs(lengths[i] - anchor), i))
    for i in by_closeness:
        if len(chosen) >= max_rows:
            break
        width = max(longest, lengths[i])
        padded = width * (len(chosen) + 1)
        if padded > max_tokens:
            continue
        if _no_worse(real, longest * len(chosen), lengths[i], padded, overhead_tokens):
            chosen.append(i)
            longest, real = width, real + lengths[i]
    return sorted(chosen)


def _no_worse(real: int, padded: int, added: int, padded_after: int, overhead: float) -> bool:
    """Does a row of `added` tokens keep real tokens per unit of cost, (real + added) /
    (overhead + padded_after) >= real / (overhead + padded)?"""
    if math.isinf(overhead):
        return True
    return (real + added) * (overhead + padded) >= real * (overhead + padded_after)
