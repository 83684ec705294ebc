"""The gRPC RewardService: each method translates messages and calls the service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc

from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.errors import BadRequest, PayloadTooLarge, ScoringError
from tokenrm.server.grpc_messages import (
    abort,
    answer_to_proto,
    error_to_proto,
    info_to_proto,
    request_from_proto,
)
from tokenrm.server.service import RewardService, ScoreAnswer, ScoreRequest

STREAM_WINDOW = 64  # requests of one ScoreStream in flight; beyond, reading waits (flow control)
T = TypeVar("T")
OnServiceLoop = Callable[[Coroutine[Any, Any, T]], Awaitable[T]]


async def _here(work: Coroutine[Any, Any, T]) -> T:
    return await work


class Undecodable:
    """What a request that is not a valid message decodes to (see grpc_server's decoding
    guard): the servicer refuses it as bad_request (INVALID_ARGUMENT)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RewardServicer(pb_grpc.RewardServiceServicer):
    """`on_service_loop` runs a coroutine on the event loop that owns the service (when gRPC
    has a loop of its own, see grpc_server); by default the service is on the caller's loop."""

    def __init__(self, service: RewardService,
                 on_service_loop: OnServiceLoop[pb.ScoreResponse] = _here) -> None:
        self.service, self.on_service_loop = service, on_service_loop

    async def Score(self, request: pb.ScoreRequest | Undecodable,  # noqa: N802 (proto names)
                    context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        try:
            return await self.score(request, context.time_remaining())
        except ScoringError as exc:
            await abort(context, exc)
            raise  # not reached: abort raises

    async def ScoreStream(self, requests: AsyncIterator[pb.ScoreRequest | Undecodable],  # noqa: N802
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreResponse]:
        """Each request starts as soon as it is read; answers go out in request order. The
        call's deadline ends the call (gRPC cancels it, and with it the queued work); it is
        not turned into per-request errors."""
        pending: asyncio.Queue[asyncio.Task[pb.ScoreResponse] | None] = \
            asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in requests:
                    await pending.put(asyncio.create_task(self.answer(request)))
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # a read error (e.g. an oversize message) ends the call with it
        finally:
            reader.cancel()
            while not pending.empty():
                if (task := pending.get_nowait()) is not None:
                    task.cancel()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return info_to_proto(self.service.info())

    async def answer(self, request: pb.ScoreRequest | Undecodable) -> pb.ScoreResponse:
        """One request of a stream: a failure is answered in place, the stream goes on."""
        try:
            return await self.score(request, None)
        except ScoringError as exc:
            info = self.service.model.info
            return pb.ScoreResponse(model=info.name, model_version=info.version,
                                    error=error_to_proto(exc))

    async def score(self, message: pb.ScoreRequest | Undecodable,
                    remaining_s: float | None) -> pb.ScoreResponse:
        """One request; ScoringError for the caller to map to a status. The time the hop to
        the service's loop takes counts against the caller's deadline."""
        seen = time.monotonic()

        async def read() -> ScoreRequest:
            if isinstance(message, Undecodable):
                raise BadRequest(message.reason)
            return request_from_proto(message)

        async def handle() -> pb.ScoreResponse:
            left = None if remaining_s is None else remaining_s - (time.monotonic() - seen)
            return await self.service.handle("grpc", read, self._respond, left)

        return await self.on_service_loop(handle())

    def _respond(self, request: ScoreRequest, answer: ScoreAnswer) -> pb.ScoreResponse:
        out = answer_to_proto(request, answer)
        limit = self.service.limits.max_message_bytes
        if out.ByteSize() > limit:
            raise PayloadTooLarge(f"the answer is {out.ByteSize()} bytes, over the message "
                                  f"limit of {limit}: send fewer or shorter items per request")
        return out

