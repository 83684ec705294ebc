"""The app factory: a FastAPI app whose lifespan loads the model and runs the engine."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from tokenrm.server.auth import KeyChecker
from tokenrm.server.engine import EngineLimits, ScoringEngine
from tokenrm.server.grpc_api import grpc_serving
from tokenrm.server.http_api import add_http_api
from tokenrm.server.metrics import EngineMetrics
from tokenrm.server.model import RewardModel
from tokenrm.server.protocol import ScoreRequest
from tokenrm.server.service import RewardService, ServiceLimits
from tokenrm.server.settings import Settings
from tokenrm.server.state import ServerState

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_model(settings: Settings) -> RewardModel:
    """The configured checkpoint, or the demo model (built and cached on first use)."""
    _workers, threads = settings.parallelism(available_cores())
    torch.set_num_threads(threads)
    if settings.model is not None:
        path = settings.model
    else:
        from tokenrm.training.demo import demo_checkpoint

        path = demo_checkpoint(settings.cache_dir)
    name = settings.model_name or ("demo-token-rm" if settings.model is None else None)
    return RewardModel.load(path, name=name, device=settings.device, dtype=settings.dtype,
                            trace=settings.trace)


@asynccontextmanager
async def serving(settings: Settings, model: RewardModel) -> AsyncIterator[ServerState]:
    """The engine and service around a loaded model, for as long as the context lasts."""
    metrics = EngineMetrics()
    workers, _threads = settings.parallelism(available_cores())
    overhead = settings.batch_overhead_tokens
    if overhead is None:
        overhead = await asyncio.to_thread(model.overhead_tokens)
        log.info("a forward pass costs about %.0f tokens of compute beyond its tokens", overhead)
    limits = EngineLimits(settings.max_batch_tokens, settings.max_batch_size,
                          settings.max_wait_ms, settings.max_queue_items, workers, overhead)
    async with ScoringEngine(model, limits, metrics) as engine:
        max_tokens = min(settings.max_tokens_per_item or model.info.max_len, model.info.max_len)
        service = RewardService(engine, ServiceLimits(
            settings.max_items_per_request, max_tokens, settings.request_timeout_s))
        yield ServerState(settings, model, engine, service, metrics, KeyChecker(settings.api_keys))


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
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus ScoreRequest, which /score parses itself (for speed and limits)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)
        request = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["ScoreRequest"] = request
        app.openapi_schema = schema
    return app.openapi_schema
