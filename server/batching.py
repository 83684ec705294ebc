"""Choosing the next batch: pure functions over the waiting rows' lengths."""

from __future__ import annotations

from collections.abc import Sequence


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a right-padded batch of these rows costs: rows x the longest."""
    return len(lengths) * max(lengths, default=0)


def pick_batch(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[int]:
    """Indices (into `lengths`, oldest first) of the rows to run next.

    The oldest row always goes, so nothing starves, even a row longer than the budget. Then
    rows closest in length to it join while the padded batch stays within `max_tokens` and
    `max_rows`: grouping by length keeps padding low.
    """
    if not lengths:
        return []
    anchor = lengths[0]
    chosen, longest = [0], anchor
    by_closeness = sorted(range(1, len(lengths)), key=lambda i: (abs(lengths[i] - anchor), i))
    for i in by_closeness:
        if len(chosen) >= max_rows:
            break
        width = max(longest, lengths[i])
        if width * (len(chosen) + 1) <= max_tokens:
            chosen.append(i)
            longest = width
    return sorted(chosen)
