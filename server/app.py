"""The app factory: a FastAPI app whose lifespan loads the model and runs the engine
(app.state.live, a LiveState, owns app.state.tokenrm)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from tokenrm.server.grpc_server import grpc_serving
from tokenrm.server.http_api import add_http_api
from tokenrm.server.http_page import add_page
from tokenrm.server.live import LiveState, available_cores, load_model
from tokenrm.server.model import RewardModel
from tokenrm.server.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, model: RewardModel | None = None, *,
               grpc: bool = False, watch_disconnects: bool = True) -> FastAPI:
    """The HTTP app; with `grpc`, its lifespan also runs the gRPC server on the same engine.
    `watch_disconnects`: an HTTP caller that hangs up cancels its scoring (off under Ray
    Serve, whose proxy cancels it). Nothing loads until the lifespan starts (e.g.
    `with TestClient(app)`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = model if model is not None else await asyncio.to_thread(load_model, settings)
        live = app.state.live = LiveState(app)
        state = await live.start(settings, loaded)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(live.aclose)
            if grpc:
                port = await stack.enter_async_context(grpc_serving(state))
                log.info("gRPC on %s:%d%s", settings.host, port,
                         " (TLS)" if settings.grpc_tls_cert else "")
            _log_serving(loaded, settings)
            yield

    # With API keys, no route but /healthz is public: the schema and docs pages go too.
    app = FastAPI(title="tokenrm", version="0.1.0", lifespan=lifespan,
                  description="Per-token rewards from a token-level reward model.",
                  openapi_url=None if settings.api_keys else "/openapi.json")
    app.state.watch_disconnects = watch_disconnects
    add_http_api(app)
    add_page(app)
    return app


def _log_serving(model: RewardModel, settings: Settings) -> None:
    """One line with what serves and how: the settings that shape speed, as they took effect."""
    info = model.info
    workers, threads = settings.parallelism(available_cores())
    log.info("serving %s (%s rewards, max %d tokens) on %s: %s, forward workers %d, torch "
             "threads per worker %d, %s forward, prefix reuse %s", info.name, info.kind,
             info.max_len, info.device, info.dtype, workers, threads,
             "traced" if info.traced else "eager", "on" if info.prefix_reuse else "off")
