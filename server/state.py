"""What a running server holds: settings, model, engine, service, metrics, key checker, and
what to tell when it starts draining."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tokenrm.server.auth import KeyChecker
from tokenrm.server.engine import ScoringEngine
from tokenrm.server.metrics import EngineMetrics
from tokenrm.server.model import RewardModel
from tokenrm.server.service import RewardService
from tokenrm.server.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    model: RewardModel
    engine: ScoringEngine
    service: RewardService
    metrics: EngineMetrics
    keys: KeyChecker
    on_drain: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.engine.ready

    async def drain(self) -> None:
        """Stop taking work (new requests: 503 / UNAVAILABLE); what is queued still runs."""
        self.engine.stop_accepting()
        for hook in self.on_drain:
            await hook()
