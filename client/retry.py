"""When and how long to wait before trying again: exponential backoff with full jitter, never
shorter than the server's own hint (Retry-After, retry-after-ms)."""

from __future__ import annotations

import random
from dataclasses import dataclass


class Retryable(Exception):
    """A failure worth another attempt. `endpoint_down`: the endpoint is unreachable, starting
    or draining (it leaves the rotation until its health check passes); otherwise it is only
    busy (overloaded) and stays."""

    def __init__(self, message: str, retry_after_s: float | None = None,
                 endpoint_down: bool = False) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s
        self.endpoint_down = endpoint_down


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt n (from 0) waits uniform(0, min(max_s, initial_s * multiplier**n)), or the
    server's hint if that is longer. `max_attempts` None: retry until the call's deadline."""

    initial_s: float = 0.05
    max_s: float = 5.0
    multiplier: float = 2.0
    max_attempts: int | None = None

    def delay_s(self, attempt: int, retry_after_s: float | None = None,
                rng: random.Random | None = None) -> float:
        ceiling = min(self.max_s, self.initial_s * self.multiplier ** attempt)
        jittered = (rng or random).uniform(0.0, ceiling)
        return max(jittered, retry_after_s or 0.0)

    def gives_up(self, attempt: int) -> bool:
        """After `attempt` failed attempts (counted from 1), is that enough?"""
        return self.max_attempts is not None and attempt >= self.max_attempts
