"""What a running server holds: settings, model, engine, service, metrics, key checker."""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def ready(self) -> bool:
        return self.engine.ready
