"""The app factory: a FastAPI app whose lifespan loads the model and runs the engine."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import torch
from fastapi import FastAPI

from tokenrm.server.auth import KeyChecker
from tokenrm.server.calibration import overhead_tokens
from tokenrm.server.engine import EngineLimits, ScoringEngine
from tokenrm.server.grpc_server import grpc_serving
from tokenrm.server.http_api import add_http_api
from tokenrm.server.metrics import EngineMetrics, RequestMetrics
from tokenrm.server.model import ModelLoadError, RewardModel
from tokenrm.server.service import Limits, RewardService
from tokenrm.server.settings import Settings
from tokenrm.server.state import ServerState

log = logging.getLogger(__name__)


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
                            dtype=settings.dtype, trace=settings.trace,
                            version=settings.model_version)


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
                                 settings.max_wait_ms, settings.max_queue_items, workers, overhead)
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


def create_app(settings: Settings, model: RewardModel | None = None, *,
               grpc: bool = False) -> FastAPI:
    """The HTTP app; with `grpc`, its lifespan also runs the gRPC server on the same engine.
    Nothing loads until the lifespan starts (e.g. `with TestClient(app)`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = model if model is not None else await asyncio.to_thread(load_model, settings)
        async with serving(settings, loaded) as state, AsyncExitStack() as stack:
            app.state.tokenrm = state
            if grpc:
                port = await stack.enter_async_context(grpc_serving(state))
                log.info("gRPC on %s:%d%s", settings.host, port,
                         " (TLS)" if settings.grpc_tls_cert else "")
            log.info("serving %s (%s rewards, max %d tokens)", loaded.info.name,
                     loaded.info.kind, loaded.info.max_len)
            yield

    # With API keys, no route but /healthz is public: the schema and docs pages go too.
    app = FastAPI(title="tokenrm", version="0.1.0", lifespan=lifespan,
                  description="Per-token rewards from a token-level reward model.",
                  openapi_url=None if settings.api_keys else "/openapi.json")
    add_http_api(app)
    return app
