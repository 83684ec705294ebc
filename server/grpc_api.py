"""The gRPC adapter: RewardService over the same service and engine as HTTP, in the same process.

Also serves grpc.health.v1 (SERVING while the engine accepts work, NOT_SERVING once draining)
and server reflection. API keys come in `authorization: Bearer <key>` metadata; every method but
the health check needs one when keys are configured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenrm.proto import reward_pb2 as pb
from tokenrm.server.auth import KeyChecker
from tokenrm.server.errors import (
    BadRequest,
    DeadlineExceeded,
    PayloadTooLarge,
    ScoringError,
    Unauthenticated,
)
from tokenrm.server.service import ItemScore, ScoreItem
from tokenrm.server.state import ServerState

SERVICE = pb.DESCRIPTOR.services_by_name["RewardService"].full_name
HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
STREAM_WINDOW = 64  # requests of one ScoreStream in flight; beyond, reading waits (flow control)

STATUS = {
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_input": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "payload_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
}


# ---------------------------------------------------------------- messages <-> service types


def item_from_proto(m: pb.Item) -> ScoreItem:
    """Unset text fields are None; the ids form is whichever item has any ids."""
    ids = bool(m.prompt_ids) or bool(m.response_ids)
    return ScoreItem(
        prompt=m.prompt if m.HasField("prompt") else None,
        response=m.response if m.HasField("response") else None,
        prompt_ids=list(m.prompt_ids) if ids else None,
        response_ids=list(m.response_ids) if ids else None,
        spans=[(s.start, s.end) for s in m.spans] if m.spans else None)


def result_to_proto(r: ItemScore, return_tokens: bool) -> pb.ItemResult:
    out = pb.ItemResult(rewards=r.rewards, total=r.total, token_ids=r.token_ids)
    if r.tokens is not None:
        out.tokens.extend(r.tokens)
    if return_tokens and r.offsets is not None:
        out.offsets.extend(x for pair in r.offsets for x in pair)
    if r.span_rewards is not None:
        out.span_rewards.extend(r.span_rewards)
    return out


def error_to_proto(exc: ScoringError) -> pb.Error:
    return pb.Error(code=exc.code, message=exc.message, item=exc.item, field=exc.field or "",
                    retry_after_ms=_retry_after_ms(exc))


def _retry_after_ms(exc: ScoringError) -> int:
    return 0 if exc.retry_after_s is None else max(1, round(exc.retry_after_s * 1000))


def trailing_metadata(exc: ScoringError) -> tuple[tuple[str, str], ...]:
    """The error's code, item, field and retry hint, for clients that act on them."""
    pairs = [("tokenrm-error-code", exc.code)]
    if exc.item is not None:
        pairs.append(("tokenrm-item", str(exc.item)))
    if exc.field is not None:
        pairs.append(("tokenrm-field", exc.field))
    if exc.retry_after_s is not None:
        pairs.append(("retry-after-ms", str(_retry_after_ms(exc))))
    return tuple(pairs)


async def abort(context: grpc.aio.ServicerContext, exc: ScoringError) -> None:
    await context.abort(STATUS[exc.code], exc.message, trailing_metadata(exc))


# ---------------------------------------------------------------- the servicer


class Undecodable:
    """What a request that is not a valid message decodes to: the servicer refuses it as
    bad_request (INVALID_ARGUMENT) instead of grpcio answering UNKNOWN."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decoder(message: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Undecodable(f"the request is not a valid {message.DESCRIPTOR.full_name} "
                               f"message: {exc}")

    return decode


def _handlers(servicer: RewardServicer) -> grpc.GenericRpcHandler:
    """The service's method table (what the generated add_..._to_server builds, but with
    decoders that let the servicer refuse undecodable requests itself)."""
    def encode(m: Message) -> bytes:
        return m.SerializeToString()

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score, request_deserializer=_decoder(pb.ScoreRequest),
            response_serializer=encode),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(
            servicer.ScoreStream, request_deserializer=_decoder(pb.ScoreRequest),
            response_serializer=encode),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=_decoder(pb.GetModelInfoRequest),
            response_serializer=encode)})


class RewardServicer:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def Score(self, request: pb.ScoreRequest | Undecodable,  # noqa: N802 (proto names)
                    context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        try:
            return await self._score(request, context.time_remaining())
        except ScoringError as exc:
            self.state.metrics.requests.labels("grpc", exc.code).inc()
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
                    await pending.put(asyncio.create_task(self._answer(request)))
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
        info, s = self.state.model.info, self.state.settings
        return pb.ModelInfo(
            name=info.name, kind=info.kind, labels=info.labels, reward_rule=info.reward_rule,
            tokenizer=info.tokenizer, tokenizer_sha256=info.tokenizer_sha256,
            vocab_size=info.vocab_size, max_len=info.max_len,
            dtype=info.dtype, device=info.device,
            limits=pb.Limits(max_items_per_request=s.max_items_per_request,
                             max_tokens_per_item=self.state.service.limits.max_tokens_per_item,
                             max_message_bytes=s.grpc_max_message_bytes,
                             max_batch_tokens=s.max_batch_tokens))

    async def _answer(self, request: pb.ScoreRequest | Undecodable) -> pb.ScoreResponse:
        try:
            return await self._score(request, None)
        except ScoringError as exc:
            self.state.metrics.requests.labels("grpc", exc.code).inc()
            return pb.ScoreResponse(model=self.state.model.info.name, error=error_to_proto(exc))

    async def _score(self, request: pb.ScoreRequest | Undecodable,
                     remaining_s: float | None) -> pb.ScoreResponse:
        """One request; `remaining_s`: the unary caller's deadline (queued work past it is
        dropped)."""
        started = time.perf_counter()
        if isinstance(request, Undecodable):
            raise BadRequest(request.reason)
        timeout_s = self.state.settings.request_timeout_s
        if remaining_s is not None:
            if remaining_s <= 0:
                raise DeadlineExceeded("the call's deadline has passed")
            timeout_s = min(timeout_s, remaining_s)
        self.state.service.admit(timeout_s)
        items = [item_from_proto(m) for m in request.items]
        results, tokens = await self.state.service.score(items, request.return_tokens, timeout_s)
        answer = pb.ScoreResponse(
            model=self.state.model.info.name,
            results=[result_to_proto(r, request.return_tokens) for r in results],
            usage=pb.Usage(items=len(results), tokens=tokens))
        limit = self.state.settings.grpc_max_message_bytes
        if answer.ByteSize() > limit:
            raise PayloadTooLarge(f"the answer is {answer.ByteSize()} bytes, over the message "
                                  f"limit of {limit}: send fewer or shorter items per request")
        self.state.metrics.requests.labels("grpc", "ok").inc()
        self.state.metrics.request_seconds.labels("grpc").observe(time.perf_counter() - started)
        return answer


# ---------------------------------------------------------------- API keys


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <key>` on every method but the health check."""

    def __init__(self, keys: KeyChecker) -> None:
        self.keys = keys

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in HEALTH_METHODS:
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            self.keys.check(metadata.get("authorization"))
        except Unauthenticated as exc:
            return _refusing(handler, exc)
        return handler


def _refusing(handler: grpc.RpcMethodHandler, exc: ScoringError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers every call with `exc`."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, exc)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}
    kind = (handler.request_streaming, handler.response_streaming)
    result: grpc.RpcMethodHandler = make[kind](
        refuse, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
    return result


# ---------------------------------------------------------------- the server


@asynccontextmanager
async def grpc_serving(state: ServerState) -> AsyncIterator[int]:
    """The gRPC server on settings.host:grpc_port for as long as the context lasts; yields the
    bound port. On exit it is NOT_SERVING and in-flight calls get what is left of the grace
    period (settings.grace_s from the first signal) to finish."""
    s = state.settings
    size = s.grpc_max_message_bytes
    interceptors = [KeyInterceptor(state.keys)] if state.keys.required else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0)])  # a port in use is an error, not a silently shared port
    server.add_generic_rpc_handlers((_handlers(RewardServicer(state)),))
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)
    address = f"{s.host}:{s.grpc_port}"
    if s.grpc_tls_cert is not None and s.grpc_tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(s.grpc_tls_key.read_bytes(), s.grpc_tls_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()

    async def set_status(status: int) -> None:
        for name in ("", SERVICE):
            await checker.set(name, status)

    await set_status(health_pb2.HealthCheckResponse.SERVING)
    state.on_drain.append(lambda: set_status(health_pb2.HealthCheckResponse.NOT_SERVING))
    try:
        yield port
    finally:
        await set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(state.grace_left_s())
