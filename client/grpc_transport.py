"""Score and GetModelInfo over a grpc.aio channel, status codes mapped to the client's errors."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenrm.client.errors import AuthenticationError, CertificateError, InputError, ServerError
from tokenrm.client.retry import Retryable
from tokenrm.client.types import Item, ItemScore, Limits, ModelInfo
from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc

RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
               grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
               grpc.StatusCode.CANCELLED}  # CANCELLED by the server: it stopped mid-call
DOWN_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
INPUT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
               grpc.StatusCode.FAILED_PRECONDITION}
NOT_RETRIED_CODES = {"payload_too_large"}  # RESOURCE_EXHAUSTED that another try cannot fix
# How gRPC's TLS handshake says the server's certificate failed verification (UNAVAILABLE)
CERTIFICATE_FAILURES = ("CERTIFICATE_VERIFY_FAILED", "Hostname Verification Check failed",
                        "is not in peer certificate")


class GrpcTransport:
    def __init__(self, target: str, api_key: str | None,
                 credentials: grpc.ChannelCredentials | None, max_message_bytes: int) -> None:
        self.target = target
        self._credentials = credentials
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel: grpc.aio.Channel | None = None
        self._stubs: tuple[pb_grpc.RewardServiceStub, health_pb2_grpc.HealthStub] | None = None

    def _connected(self) -> tuple[pb_grpc.RewardServiceStub, health_pb2_grpc.HealthStub]:
        """The stubs, on a channel opened on first use: grpc.aio binds it to the running loop."""
        if self._stubs is None:
            self._channel = grpc.aio.secure_channel(
                self.target, self._credentials, self._options) if self._credentials \
                else grpc.aio.insecure_channel(self.target, self._options)
            self._stubs = (pb_grpc.RewardServiceStub(self._channel),
                           health_pb2_grpc.HealthStub(self._channel))
        return self._stubs

    async def model_info(self, timeout_s: float) -> ModelInfo:
        m = await self._call(self._connected()[0].GetModelInfo, pb.GetModelInfoRequest(),
                             timeout_s)
        return ModelInfo(
            name=m.name, kind=m.kind, labels=tuple(m.labels), reward_rule=m.reward_rule,
            vocab_size=m.vocab_size, max_len=m.max_len,
            limits=Limits(max_items_per_request=m.limits.max_items_per_request,
                          max_tokens_per_item=m.limits.max_tokens_per_item,
                          max_request_bytes=m.limits.max_message_bytes),
            tokenizer_sha256=m.tokenizer_sha256, version=m.version)

    async def score(self, items: Sequence[Item], return_tokens: bool,
                    timeout_s: float) -> list[ItemScore]:
        request = pb.ScoreRequest(items=[_item_proto(it) for it in items],
                                  return_tokens=return_tokens)
        answer = await self._call(self._connected()[0].Score, request, timeout_s)
        return [_score(r, return_tokens) for r in answer.results]

    async def healthy(self, timeout_s: float) -> bool:
        try:
            reply = await self._connected()[1].Check(health_pb2.HealthCheckRequest(),
                                                     timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def _call(self, method, request, timeout_s):  # type: ignore[no-untyped-def]
        try:
            return await method(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _error(self.target, exc) from exc


def _error(target: str, exc: grpc.aio.AioRpcError) -> Exception:
    trailing = dict(exc.trailing_metadata() or ())
    message = f"{target}: {exc.code().name}: {exc.details()}"
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE and any(
            marker in (exc.details() or "") for marker in CERTIFICATE_FAILURES):
        return CertificateError(f"{message} (trust the server's certificate with "
                                "root_certificates= or GRPC_DEFAULT_SSL_ROOTS_FILE_PATH)")
    if code in RETRY_CODES and trailing.get("tokenrm-error-code") not in NOT_RETRIED_CODES:
        after_ms = trailing.get("retry-after-ms")
        return Retryable(message, int(after_ms) / 1000 if after_ms else None,
                         endpoint_down=code in DOWN_CODES)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(message)
    if code == grpc.StatusCode.INTERNAL and "tokenrm-error-code" not in trailing:
        return Retryable(message)  # not tokenrm's answer: e.g. Ray Serve's replica died
    if code not in INPUT_CODES and trailing.get("tokenrm-error-code") not in NOT_RETRIED_CODES:
        return ServerError(message)  # INTERNAL, UNKNOWN, UNIMPLEMENTED, ...: not the input
    item = trailing.get("tokenrm-item")
    return InputError(message, int(item) if item is not None else None,
                      trailing.get("tokenrm-field"))


def _item_proto(item: Item) -> pb.Item:
    if item.response is not None:
        spans = [pb.Span(start=a, end=b) for a, b in item.spans or ()]
        return pb.Item(prompt=item.prompt or "", response=item.response, spans=spans)
    return pb.Item(prompt_ids=item.prompt_ids or (), response_ids=item.response_ids or ())


def _score(r: pb.ItemResult, return_tokens: bool) -> ItemScore:
    """Repeated fields cannot be null: empty offsets (a token item) and spans mean none."""
    offsets = np.asarray(r.offsets, dtype=np.int64).reshape(-1, 2) \
        if return_tokens and len(r.offsets) else None
    return ItemScore(
        rewards=np.asarray(r.rewards, dtype=np.float32),
        token_ids=np.asarray(r.token_ids, dtype=np.int64), offsets=offsets,
        tokens=list(r.tokens) if return_tokens else None,
        span_rewards=np.asarray(r.span_rewards, dtype=np.float32) if len(r.span_rewards)
        else None,
        total=r.total)
