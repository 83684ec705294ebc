"""A forward pass's fixed cost, measured at start-up: batching weighs padding against it."""

from __future__ import annotations

import math
import time

from tokenrm.server.model import RewardModel


def overhead_tokens(model: RewardModel, repeats: int = 7) -> float:
    """The fixed cost of one forward pass, in tokens of compute: fitted as a + b x tokens
    from the median times of a small and a larger batch, it is a / b. Batching weighs
    padding against it; inf when the timings show no cost per token (batch freely)."""
    small, large = [([1] * 16, 1)], [([1] * 64, 1)] * 8

    def median_s(rows: list[tuple[list[int], int]]) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model.score(rows)
            times.append(time.perf_counter() - started)
        return sorted(times)[repeats // 2]

    median_s(large)  # warm-up
    t_small, t_large = median_s(small), median_s(large)
    per_token = (t_large - t_small) / (8 * 64 - 16)
    if per_token <= 0:
        return math.inf
    return max(0.0, t_small - 16 * per_token) / per_token
