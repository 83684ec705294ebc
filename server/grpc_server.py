"""The gRPC server: RewardService (registered with the generated add_..._to_server), the
standard health service and reflection, on the same service and engine as HTTP.

Health is SERVING while the engine accepts work and NOT_SERVING once draining. API keys come in
`authorization: Bearer <key>` metadata; every method but the health check needs one when keys
are configured.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

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
HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
          (False, True): grpc.unary_stream_rpc_method_handler,
          (True, False): grpc.stream_unary_rpc_method_handler,
          (True, True): grpc.stream_stream_rpc_method_handler}


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Before a call reaches a servicer: refuses it without a valid key (when keys are set;
    health checks are exempt), and for RewardService lets a request that is not a valid
    message reach the servicer as Undecodable (answered INVALID_ARGUMENT, bad_request) instead
    of grpcio's own UNKNOWN."""

    def __init__(self, keys: KeyChecker) -> None:
        self.keys = keys
        self._tolerant: dict[str, grpc.RpcMethodHandler] = {}  # by method, made once

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in HEALTH_METHODS:
            return handler
        if self.keys.required:
            try:
                self.keys.check(dict(details.invocation_metadata or ()).get("authorization"))
            except Unauthenticated as exc:
                return _refusing(handler, exc)
        tolerant = self._tolerant.get(details.method)
        if tolerant is None:
            service, _, method = details.method.lstrip("/").rpartition("/")
            if service != SERVICE.full_name:
                return handler
            tolerant = _with_deserializer(handler, _tolerant(
                handler.request_deserializer, SERVICE.methods_by_name[method]))
            self._tolerant[details.method] = tolerant
        return tolerant


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
    """The gRPC server on settings.host:grpc_port for as long as the context lasts; yields the
    bound port. On exit it is NOT_SERVING and in-flight calls get what is left of the grace
    period (settings.grace_s from the first signal) to finish."""
    s = state.settings
    size = s.grpc_max_message_bytes
    server = grpc.aio.server(interceptors=[GuardInterceptor(state.keys)], options=[
        ("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0)])  # a port in use is an error, not a silently shared port
    pb_grpc.add_RewardServiceServicer_to_server(RewardServicer(state.service), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
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

    async def set_status(status: int) -> None:
        for name in ("", SERVICE.full_name):
            await checker.set(name, status)

    await set_status(health_pb2.HealthCheckResponse.SERVING)
    state.on_drain.append(lambda: set_status(health_pb2.HealthCheckResponse.NOT_SERVING))
    try:
        yield port
    finally:
        await set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(state.grace_left_s())
