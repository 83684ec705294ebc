"""`tokenrm serve`: HTTP (uvicorn) and gRPC in one process, on one engine, until SIGTERM/SIGINT.

The first signal starts a drain: the engine refuses new work (503 / UNAVAILABLE), gRPC health
turns NOT_SERVING, HTTP stops accepting connections, and in-flight requests get `grace_s` to
finish. Then the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI

from tokenrm.server.app import create_app
from tokenrm.server.http_headers import BoundedHeadersProtocol
from tokenrm.server.live import load_model
from tokenrm.server.settings import Settings, misread_variables

log = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server that also tells the engine and gRPC to drain on the first signal."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain. A second SIGINT: refuse the queued work now (503 /
        UNAVAILABLE) and exit as soon as the batches in the model are done (uvicorn's own force
        quit would cancel requests mid-answer, 500s, and skip the model's shutdown). A second
        SIGTERM changes nothing."""
        state = getattr(self._app.state, "tokenrm", None)
        loop = self._loop
        if state is None or loop is None:
            super().handle_exit(sig, frame)
        elif self.should_exit and sig == signal.SIGINT:  # Ctrl-C twice: stop now
            log.warning("second SIGINT: refusing the queued work and exiting")
            loop.call_soon_threadsafe(state.service.engine.abandon_waiting)
        elif self.should_exit:  # a repeated SIGTERM (some supervisors send several)
            log.info("already draining")
        else:  # in a signal handler: schedule the drain on the loop, do not run it here
            loop.call_soon_threadsafe(lambda: loop.create_task(state.drain()))
            super().handle_exit(sig, frame)


@contextmanager
def _exit_zero_after_signals() -> Iterator[None]:
    """uvicorn re-raises the signal it stopped on, under the handler that was there before
    it started; with this no-op handler a graceful stop ends in exit status 0, not death by
    SIGTERM."""
    previous = {sig: signal.signal(sig, lambda *_: None)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class PortInUse(RuntimeError):
    """The gRPC port is taken (HTTP's is reported by uvicorn, in one line)."""


def check_grpc_port(settings: Settings) -> None:
    """Raise PortInUse when something listens on the gRPC port already: gRPC binds it only
    once the app starts, where a failure would end in uvicorn's traceback."""
    if settings.grpc_port == 0:
        return
    family, kind, proto, _, address = socket.getaddrinfo(
        settings.host, settings.grpc_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            probe.bind(address)
        except OSError as exc:
            raise PortInUse(f"{settings.host}:{settings.grpc_port} (TOKENRM_GRPC_PORT, "
                            f"--grpc-port): {exc.strerror}") from None


def run(settings: Settings) -> None:
    """Load the model first, so that a bad checkpoint fails here with its reason, then serve."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for line in misread_variables(os.environ):
        log.warning(line)
    check_grpc_port(settings)
    app = create_app(settings, load_model(settings), grpc=settings.grpc_port != 0)
    config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_level="info",
                            http=BoundedHeadersProtocol,
                            timeout_graceful_shutdown=math.ceil(settings.grace_s),
                            access_log=False)
    with _exit_zero_after_signals():
        _DrainingServer(config, app).run()
