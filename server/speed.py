"""The engine's measured speed, what a queue of rows costs at it, and how late work really
finishes against that: the basis of admission by expected wait and of the retry hints."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence

import numpy as np


class Speed:
    """Wall seconds per cost token, all forward threads together, as a moving average.

    A batch's cost is its padded tokens plus a forward pass's fixed cost (`overhead_tokens`).
    Each finished batch updates the average: over the time since the previous batch finished
    when the engine was busy throughout (work was waiting or running then), else over the
    batch's own run time shared by the workers.
    """

    def __init__(self, workers: int, overhead_tokens: float, max_batch_size: int,
                 max_batch_tokens: int) -> None:
        self.workers = workers
        self.overhead = 0.0 if math.isinf(overhead_tokens) else overhead_tokens
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.seconds_per_token: float | None = None  # None until a batch was measured
        self._last_done: float | None = None          # time.monotonic() of the last batch
        self._busy_at_last_done = False

    def cost(self, lengths: Sequence[int]) -> float:
        """Tokens plus each forward's fixed cost, in tokens, of scoring rows of `lengths`."""
        batches = max(len(lengths) / self.max_batch_size,
                      sum(lengths) / self.max_batch_tokens, 1.0 if lengths else 0.0)
        return sum(lengths) + batches * self.overhead

    def seconds(self, lengths: Sequence[int]) -> float:
        """About how long rows of `lengths` take at the measured speed; 0 until measured."""
        if self.seconds_per_token is None:
            return 0.0
        return self.cost(lengths) * self.seconds_per_token

    def observe(self, started_at: float, padded: int, busy: bool) -> None:
        """A batch of `padded` tokens that started at `started_at` just finished; `busy`: work
        is still waiting or running."""
        now = time.monotonic()
        cost = padded + self.overhead
        if self._last_done is not None and self._busy_at_last_done:
            sample = (now - self._last_done) / cost
        else:
            sample = (now - started_at) / cost / self.workers
        self._last_done, self._busy_at_last_done = now, busy
        old = self.seconds_per_token
        self.seconds_per_token = sample if old is None else 0.8 * old + 0.2 * sample


class Lateness:
    """How much later than the speed model predicts work really finishes, on this machine and
    under its load now: the model counts only the forward passes, while tokenizing, the
    front doors, other processes and bursts of requests admitted together also take time.

    Each request scored records actual / predicted (from entering the queue to its last
    reward; predicted: the work ahead of it and its own at the measured speed), when the
    prediction is long enough to mean something; an expired request records its deadline over
    its prediction (a lower bound of its real ratio). `factor` is a high quantile of the
    recent ratios, never below 1: admission multiplies its expected wait by it.
    """

    def __init__(self, window: int = 256, quantile: float = 0.95, min_samples: int = 8,
                 min_predicted_s: float = 0.02) -> None:
        self.quantile, self.min_samples, self.min_predicted_s = quantile, min_samples, \
            min_predicted_s
        self._ratios: deque[float] = deque(maxlen=window)
        self.factor = 1.0

    def observe(self, predicted_s: float, actual_s: float) -> None:
        if predicted_s < self.min_predicted_s:
            return  # mostly fixed costs: says nothing about the queue's speed
        self._ratios.append(actual_s / predicted_s)
        if len(self._ratios) >= self.min_samples:
            self.factor = max(1.0, float(np.quantile(self._ratios, self.quantile)))
