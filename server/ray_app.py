"""The server as a Ray Serve application: N replicas of the same app, each loading the model and
running its own ScoringEngine (batching stays inside a replica), behind Ray Serve's HTTP proxy
(the same routes, JSON, errors and API keys) and its gRPC proxy (RewardService's Score,
ScoreStream and GetModelInfo, and grpc.health.v1 Check answered by a replica).

    serve run tokenrm.server.ray_app:app model=/path/to/checkpoint   # Ray's own tools
    tokenrm serve --ray --replicas 2                                 # or this
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import ray
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from tokenrm.proto import reward_pb2 as pb
from tokenrm.server.app import create_app
from tokenrm.server.errors import ScoringError, Unauthenticated
from tokenrm.server.grpc_messages import STATUS, info_to_proto, trailing_metadata
from tokenrm.server.grpc_servicer import RewardServicer
from tokenrm.server.settings import Settings
from tokenrm.server.state import ServerState

SERVICER_FUNCTIONS = ["tokenrm.proto.reward_pb2_grpc.add_RewardServiceServicer_to_server",
                      "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]


class TokenRM:
    """One replica (made a Ray Serve ingress deployment by `deployment`): HTTP comes through
    the ingress app; gRPC through the methods named as in the proto.
    A refused gRPC call sets its status and trailing metadata and returns (Ray Serve
    drops trailing metadata set before an exception)."""

    def __init__(self) -> None:
        self._servicer: RewardServicer | None = None

    def _state(self) -> ServerState:
        state: ServerState = self.app.state.tokenrm  # type: ignore[attr-defined]
        return state

    def _checked(self, context: RayServegRPCContext) -> RewardServicer:
        state = self._state()
        state.keys.check(dict(context.invocation_metadata()).get("authorization"))
        if self._servicer is None:
            self._servicer = RewardServicer(state.service)
        return self._servicer

    async def Score(self, request: pb.ScoreRequest,  # noqa: N802 (proto names)
                    grpc_context: RayServegRPCContext) -> pb.ScoreResponse:
        try:
            return await self._checked(grpc_context).score(request, None)
        except ScoringError as exc:
            return _refused(grpc_context, exc, pb.ScoreResponse())

    async def ScoreStream(self, request_stream: AsyncIterator[pb.ScoreRequest],  # noqa: N802
                          grpc_context: RayServegRPCContext
                          ) -> AsyncIterator[pb.ScoreResponse]:
        """Answered in order, one request at a time (Ray Serve relays each message)."""
        try:
            servicer = self._checked(grpc_context)
        except Unauthenticated as exc:
            _refused(grpc_context, exc, None)
            return
        async for request in request_stream:
            yield await servicer.answer(request)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,  # noqa: N802
                           grpc_context: RayServegRPCContext) -> pb.ModelInfo:
        try:
            self._checked(grpc_context)
        except ScoringError as exc:
            return _refused(grpc_context, exc, pb.ModelInfo())
        return info_to_proto(self._state().service.info())

    async def Check(self, request: health_pb2.HealthCheckRequest  # noqa: N802
                    ) -> health_pb2.HealthCheckResponse:
        ready = self._state().service.ready
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def check_health(self) -> None:
        """Ray Serve's replica health check: the engine must be taking work."""
        if not self._state().service.ready:
            raise RuntimeError("the scoring engine is not accepting work")


def deployment(settings: Settings, options: dict[str, Any]) -> serve.Application:
    """The application: `options` are Ray Serve's deployment options (num_replicas or
    autoscaling_config, ray_actor_options, max_ongoing_requests, ...)."""
    app = create_app(settings)  # its lifespan runs in every replica: model, engine, service
    ingress = serve.deployment(name="tokenrm", **options)(serve.ingress(app)(TokenRM))
    return ingress.bind()


def _refused(context: RayServegRPCContext, exc: ScoringError, empty: Any) -> Any:
    context.set_code(STATUS.get(exc.code, grpc.StatusCode.INTERNAL))
    context.set_details(exc.message)
    context.set_trailing_metadata(list(trailing_metadata(exc)))
    return empty


def app(args: dict[str, Any]) -> serve.Application:
    """For Ray's own tools: `serve run tokenrm.server.ray_app:app model=DIR [name=value ...]`
    (any Settings field), one replica per `serve run`; more with a Serve config file."""
    return deployment(Settings(**args), {})


def run(settings: Settings, options: dict[str, Any], address: str | None = None,
        metrics_port: int | None = None) -> None:
    """Start (or join, with `address`) Ray, serve the application on settings.host:http_port
    and gRPC on grpc_port (0: none) through Ray Serve's proxies, until SIGTERM or SIGINT.
    `metrics_port`: where a local Ray exports every replica's metrics (Prometheus text)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    extra: dict[str, Any] = {} if address or metrics_port is None else {
        "_metrics_export_port": metrics_port}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, **extra)
    grpc_options = None if settings.grpc_port == 0 else {
        "port": settings.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS}
    serve.start(http_options={"host": settings.host, "port": settings.http_port},
                grpc_options=grpc_options)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.run(deployment(settings, options), name="tokenrm", route_prefix="/")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
