"""What a running server holds (settings, the service, the key checker, the metrics registry)
and how it drains."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from tokenrm.server.auth import KeyChecker
from tokenrm.server.service import RewardService
from tokenrm.server.settings import Settings

# Queued work still waiting this long before the grace period ends is refused, not cut.
GRACE_MARGIN_S = 0.5


@dataclass
class ServerState:
    settings: Settings
    service: RewardService
    keys: KeyChecker
    registry: CollectorRegistry
    on_drain: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    drain_started: float | None = None   # time.monotonic() of the first signal

    def grace_left_s(self) -> float:
        """What is left of the grace period (all of it before a drain started)."""
        if self.drain_started is None:
            return self.settings.grace_s
        return max(0.0, self.settings.grace_s - (time.monotonic() - self.drain_started))

    async def drain(self) -> None:
        """Stop taking work (new requests: 503 / UNAVAILABLE); what is queued still runs, and
        what is still queued shortly before the grace period ends is answered 503 /
        UNAVAILABLE, before the HTTP server cancels its requests (which would answer 500)."""
        self.drain_started = time.monotonic()
        engine = self.service.engine
        engine.stop_accepting()
        asyncio.get_running_loop().call_later(
            max(0.0, self.settings.grace_s - GRACE_MARGIN_S), engine.abandon_waiting)
        for hook in self.on_drain:
            await hook()
