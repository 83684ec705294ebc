"""Alignment between tokenizers by character spans: a policy token's span in its decoded text,
and the RM's rewards summed into such spans (torch-free)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np


def span_rewards(offsets: Sequence[tuple[int, int]], rewards: np.ndarray,
                 spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Sum each RM token's reward into the span holding the token's last character.

    `spans` are sorted, non-overlapping [start, end) character spans. A token whose last
    character lies in no span goes to the nearest span, so the total is always conserved; a
    span that receives no token gets 0. A token with an empty offset (start, start) is
    whitespace the tokenizer trimmed away from its offsets: its character is the one before.
    """
    out = np.zeros(len(spans), dtype=np.float64)
    if not spans:
        return out.astype(np.float32)
    starts = [s for s, _ in spans]
    for (start, end), reward in zip(offsets, rewards, strict=True):
        last = end - 1 if end > start else max(start - 1, 0)
        i = bisect.bisect_right(starts, last) - 1  # the last span starting at or before it
        if i < 0:
            i = 0
        elif last >= spans[i][1] and i + 1 < len(spans) and \
                spans[i + 1][0] - last < last - (spans[i][1] - 1):
            i += 1  # in a gap, nearer to the next span
        out[i] += float(reward)
    return out.astype(np.float32)


def decoded_with_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text and each token's character span in it (empty for a token that only
    completes a character started by the one before)."""
    text, offsets = "", []
    for n in range(1, len(ids) + 1):
        longer = tokenizer.decode(ids[:n])
        start = min(len(text), len(longer))
        offsets.append((start, len(longer)))
        text = longer
    return text, offsets
