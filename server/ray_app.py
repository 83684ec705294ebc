"""The server as a Ray Serve application: N replicas of the same app, each loading the model and
running its own ScoringEngine (batching stays inside a replica), behind Ray Serve's HTTP proxy
(the same routes, JSON, errors and API keys) and its gRPC proxy (RewardService's Score,
ScoreStream and GetModelInfo, and grpc.health.v1 Check answered by a replica).

    serve run tokenrm.server.ray_app:app model=/path/to/checkpoint   # Ray's own tools
    tokenrm serve --ray --replicas 2                                 # or this (ray_deploy)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from tokenrm.proto import reward_pb2 as pb
from tokenrm.server.app import create_app
from tokenrm.server.errors import ScoringError, Unauthenticated
from tokenrm.server.grpc_messages import STATUS, info_to_proto, trailing_metadata
from tokenrm.server.grpc_servicer import RewardServicer
from tokenrm.server.live import LiveState
from tokenrm.server.settings import Settings
from tokenrm.server.state import ServerState

DEPLOYMENT = "tokenrm"


class TokenRM:
    """One replica (made a Ray Serve ingress deployment by `app`): HTTP comes through
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
        if self._servicer is None or self._servicer.service is not state.service:
            self._servicer = RewardServicer(state.service)
        return self._servicer

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Ray Serve's user_config, {"model": DIR, "model_version": V or null}: a checkpoint
        other than the one serving loads beside it, then takes the requests (LiveState).
        Called again with the same config (Ray may), it does nothing."""
        unknown = set(config) - {"model", "model_version"}
        if unknown or not config.get("model"):
            raise ValueError(f"user_config: {sorted(unknown) or 'model'}: give "
                             "{model: DIR, model_version: V (optional)} and nothing else")
        live: LiveState = self.app.state.live  # type: ignore[attr-defined]
        current = live.state.settings
        model, version = Path(config["model"]), config.get("model_version")
        if (model, version) != (current.model, current.model_version):
            await live.replace(current.model_copy(update={"model": model,
                                                          "model_version": version}))

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


def _refused(context: RayServegRPCContext, exc: ScoringError, empty: Any) -> Any:
    context.set_code(STATUS.get(exc.code, grpc.StatusCode.INTERNAL))
    context.set_details(exc.message)
    context.set_trailing_metadata(list(trailing_metadata(exc)))
    return empty


def app(args: dict[str, Any]) -> serve.Application:
    """The application, for Ray's own tools: `serve run tokenrm.server.ray_app:app model=DIR
    [name=value ...]` (any Settings field), or `import_path` of a Serve config file (where
    num_replicas, autoscaling_config, ... and the checkpoint, as `user_config`, are set per
    deployment: see ray_deploy). A replica loads args' model, then the user_config's."""
    settings = Settings(**args)
    ingress = serve.deployment(name=DEPLOYMENT, user_config=checkpoint(settings))(
        # the app's lifespan runs per replica; Ray's proxy cancels the request of an HTTP
        # caller that hangs up
        serve.ingress(create_app(settings, watch_disconnects=False))(TokenRM))
    return ingress.bind()


def checkpoint(settings: Settings) -> dict[str, str | None]:
    """The user_config naming a checkpoint: changing it updates replicas in place."""
    return {"model": None if settings.model is None else str(settings.model),
            "model_version": settings.model_version}
