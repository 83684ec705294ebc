"""One reward per response from its per-token rewards, for trainers that take one scalar
(OpenRLHF, TRL). torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

Reduction = Literal["total", "mean", "min", "last"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
"""total: the sum (the default: what the token rewards add up to); mean: per token, so length
does not count; min: the most negative token (a response is as bad as its worst token); last:
the last token's (a sequence RM's score)."""


def reduce_rewards(rewards: Sequence[float] | np.ndarray, how: str = "total") -> float:
    """The response's reward by `how` (one of REDUCTIONS); 0.0 for a response of no tokens."""
    values = np.asarray(rewards, dtype=np.float64)
    if how not in REDUCTIONS:
        raise ValueError(f"reduction {how!r}: choose one of {', '.join(REDUCTIONS)}")
    if values.size == 0:
        return 0.0
    if how == "total":
        return float(values.sum())
    if how == "mean":
        return float(values.mean())
    if how == "min":
        return float(values.min())
    return float(values[-1])


def token_summary(rewards: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Scalars worth logging beside a response's reward: its most negative token reward, how
    many tokens are negative, how many tokens it has."""
    values = np.asarray(rewards, dtype=np.float64)
    return {"tokenrm_min_token_reward": float(values.min()) if values.size else 0.0,
            "tokenrm_negative_tokens": float((values < 0).sum()),
            "tokenrm_response_tokens": float(values.size)}
