"""Loading a model and serving from it: the engine and service around a model, and the state an
app serves from, replaceable while it serves (a new checkpoint loads beside the old one,
requests move to it at once, the old engine closes when its last request is answered; Ray
Serve replicas update their model in place this way)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import torch

from tokenrm.server.auth import KeyChecker
from tokenrm.server.calibration import overhead_tokens
from tokenrm.server.engine import EngineLimits, ScoringEngine
from tokenrm.server.metrics import EngineMetrics, RequestMetrics
from tokenrm.server.model import ModelLoadError, RewardModel
from tokenrm.server.service import Limits, RewardService
from tokenrm.server.settings import Settings
from tokenrm.server.state import ServerState

log = logging.getLogger(__name__)

# A request may hold the old state a moment before it is counted in flight (between reading
# app.state and entering the service): the old engine stays open at least this long.
SETTLE_S = 1.0


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_model(settings: Settings) -> RewardModel:
    """The configured checkpoint (`tokenrm serve` resolves the demo model into settings.model
    when none is given)."""
    if settings.model is None:
        raise ModelLoadError("no model: set TOKENRM_MODEL (or --model) to a checkpoint directory")
    _workers, threads = settings.parallelism(available_cores())
    torch.set_num_threads(threads)
    return RewardModel.load(settings.model, name=settings.model_name, device=settings.device,
                            dtype=settings.dtype,
                            trace=settings.trace if settings.trace is not None
                            else settings.device == "cpu",
                            version=settings.model_version, prefix_reuse=settings.prefix_reuse)


@asynccontextmanager
async def serving(settings: Settings, model: RewardModel) -> AsyncIterator[ServerState]:
    """The engine and service around a loaded model, for as long as the context lasts."""
    metrics = EngineMetrics()
    workers, _threads = settings.parallelism(available_cores())
    overhead = settings.batch_overhead_tokens
    if overhead is None:
        overhead = await asyncio.to_thread(overhead_tokens, model)
        log.info("a forward pass costs about %.0f tokens of compute beyond its tokens", overhead)
    engine_limits = EngineLimits(settings.max_batch_tokens, settings.max_batch_size,
                                 settings.max_wait_ms, settings.max_queue_items, workers, overhead,
                                 model.info.prefix_reuse)
    limits = Limits(
        max_items_per_request=settings.max_items_per_request,
        max_tokens_per_item=min(settings.max_tokens_per_item or model.info.max_len,
                                model.info.max_len),
        request_timeout_s=settings.request_timeout_s, max_body_bytes=settings.max_body_bytes,
        max_message_bytes=settings.grpc_max_message_bytes,
        max_batch_tokens=settings.max_batch_tokens)
    async with ScoringEngine(model, engine_limits, metrics) as engine:
        service = RewardService(engine, limits, RequestMetrics(metrics.registry))
        yield ServerState(settings, service, KeyChecker(settings.api_keys), metrics.registry)


class LiveState:
    """Owns app.state.tokenrm: `start` it once, `replace` it any number of times, `aclose` at
    the end. Replacements run one at a time."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._stack: AsyncExitStack | None = None
        self._lock = asyncio.Lock()

    @property
    def state(self) -> ServerState:
        state: ServerState = self._app.state.tokenrm
        return state

    async def start(self, settings: Settings, model: RewardModel) -> ServerState:
        stack = AsyncExitStack()
        state = await stack.enter_async_context(serving(settings, model))
        self._app.state.tokenrm, self._stack = state, stack
        return state

    async def replace(self, settings: Settings) -> None:
        """Load `settings.model` and serve from it; the old state finishes what it holds.
        A load that fails leaves the old state serving and raises."""
        async with self._lock:
            old, old_stack = self.state, self._stack
            model = await asyncio.to_thread(load_model, settings)
            await self.start(settings, model)
            log.info("now serving %s version %s", model.info.name, model.info.version)
            swapped = time.monotonic()
            await asyncio.sleep(SETTLE_S)
            deadline = swapped + old.settings.request_timeout_s + SETTLE_S
            while old.service.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if old_stack is not None:
                await old_stack.aclose()

    async def aclose(self) -> None:
        async with self._lock:
            if self._stack is not None:
                await self._stack.aclose()
                self._stack = None
