"""The gRPC server: RewardService (registered with the generated add_..._to_server), the
standard health service and reflection, on the same service and engine as HTTP.

Health is SERVING while the engine accepts work and NOT_SERVING once draining. API keys come in
`authorization: Bearer <key>` metadata; every method but the health check needs one when keys
are configured.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.auth import KeyChecker
from tokenrm.server.errors import ScoringError, Unauthenticated
from tokenrm.server.grpc_messages import abort
from tokenrm.server.grpc_servicer import RewardServicer, Undecodable
from tokenrm.server.state import ServerState

SERVICE = pb.DESCRIPTOR.services_by_name["RewardService"]
T = TypeVar("T")
HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
          (False, True): grpc.unary_stream_rpc_method_handler,
          (True, False): grpc.stream_unary_rpc_method_handler,
          (True, True): grpc.stream_stream_rpc_method_handler}


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without a valid key (installed only when keys are set; health checks are
    exempt)."""

    def __init__(self, keys: KeyChecker) -> None:
        self.keys = keys

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in HEALTH_METHODS:
            return handler
        try:
            self.keys.check(dict(details.invocation_metadata or ()).get("authorization"))
        except Unauthenticated as exc:
            return _refusing(handler, exc)
        return handler


class _Tolerant:
    """The server as the generated add_RewardServiceServicer_to_server sees it: each handler it
    registers gets a deserializer that hands a request that is not a valid message to the
    servicer as Undecodable (answered INVALID_ARGUMENT, bad_request) instead of letting grpcio
    fail the call itself. Done once, at registration: no cost per call."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.server.add_generic_rpc_handlers(tuple(_TolerantGeneric(h) for h in handlers))

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(
            service, {name: _tolerant_handler(h, name) for name, h in handlers.items()})


class _TolerantGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self.inner = inner

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self.inner.service(details)
        if handler is None:
            return None
        return _tolerant_handler(handler, details.method.rpartition("/")[2])


def _tolerant_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    return _with_deserializer(handler, _tolerant(handler.request_deserializer,
                                                 SERVICE.methods_by_name[method]))


def _tolerant(decode: Callable[[bytes], Any], method: Any) -> Callable[[bytes], Any]:
    def decode_or_refuse(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as exc:
            return Undecodable(f"the request is not a valid {method.input_type.full_name} "
                               f"message: {exc}")

    return decode_or_refuse


def _kind(handler: grpc.RpcMethodHandler) -> Callable[..., grpc.RpcMethodHandler]:
    return _KINDS[(handler.request_streaming, handler.response_streaming)]


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)


def _with_deserializer(handler: grpc.RpcMethodHandler,
                       decode: Callable[[bytes], Any]) -> grpc.RpcMethodHandler:
    return _kind(handler)(_behaviour(handler), request_deserializer=decode,
                          response_serializer=handler.response_serializer)


def _refusing(handler: grpc.RpcMethodHandler, exc: ScoringError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers every call with `exc`."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, exc)

    return _kind(handler)(refuse, request_deserializer=handler.request_deserializer,
                          response_serializer=handler.response_serializer)


@asynccontextmanager
async def grpc_serving(state: ServerState) -> AsyncIterator[int]:
    """The gRPC server on settings.host:grpc_port for as long as the context lasts, on an event
    loop of its own in its own thread (so that HTTP's work on the service's loop does not hold
    gRPC's calls back before they are seen); yields the bound port. Each call is scored on the
    service's loop. On exit it is NOT_SERVING and in-flight calls get what is left of the grace
    period (settings.grace_s from the first signal) to finish."""
    thread = _GrpcThread(state, asyncio.get_running_loop())
    port = await thread.start()
    state.on_drain.append(thread.not_serving)
    try:
        yield port
    finally:
        await thread.stop(state.grace_left_s())


class _GrpcThread:
    """A grpc.aio server and the loop it runs on (grpc.aio objects stay on the loop that made
    them: everything here is started, changed and stopped through `_on_grpc_loop`)."""

    def __init__(self, state: ServerState, service_loop: asyncio.AbstractEventLoop) -> None:
        self.state, self.service_loop = state, service_loop
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tokenrm-grpc",
                                       daemon=True)
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()

    async def _on_grpc_loop(self, work: Coroutine[Any, Any, T]) -> T:
        return await _on(self.loop, work)

    async def _on_service_loop(self, work: Coroutine[Any, Any, T]) -> T:
        return await _on(self.service_loop, work)

    async def start(self) -> int:
        self.thread.start()
        try:
            return await self._on_grpc_loop(self._start())
        except BaseException:
            await self._end_thread()
            raise

    async def not_serving(self) -> None:
        await self._on_grpc_loop(self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING))

    async def stop(self, grace_s: float) -> None:
        try:
            await self._on_grpc_loop(self._stop(grace_s))
        finally:
            await self._end_thread()

    async def _end_thread(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join)
        self.loop.close()

    async def _start(self) -> int:
        s = self.state.settings
        size = s.grpc_max_message_bytes
        keys = self.state.keys
        server = grpc.aio.server(
            interceptors=[KeyInterceptor(keys)] if keys.required else [], options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.so_reuseport", 0)])  # a port in use is an error, not a shared port
        pb_grpc.add_RewardServiceServicer_to_server(
            RewardServicer(self.state.service, self._on_service_loop), _Tolerant(server))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE.full_name, health.SERVICE_NAME,
                                             reflection.SERVICE_NAME), server)
        address = f"{s.host}:{s.grpc_port}"
        if s.grpc_tls_cert is not None and s.grpc_tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(s.grpc_tls_key.read_bytes(), s.grpc_tls_cert.read_bytes())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        await server.start()
        self.server = server
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)
        return port

    async def _set_status(self, status: int) -> None:
        for name in ("", SERVICE.full_name):
            await self.health.set(name, status)

    async def _stop(self, grace_s: float) -> None:
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(grace_s)


async def _on(loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` on `loop` (another thread's) and await its result here; cancelling the wait
    cancels the work."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))
