"""gRPC messages <-> the service's types, and domain errors as gRPC statuses (one table)."""

from __future__ import annotations

import grpc

from tokenrm.proto import reward_pb2 as pb
from tokenrm.server.errors import ScoringError
from tokenrm.server.items import ItemScore, ScoreItem
from tokenrm.server.service import ScoreAnswer, ScoreRequest, ServiceInfo

STATUS = {
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_input": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "payload_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
}


def request_from_proto(m: pb.ScoreRequest) -> ScoreRequest:
    return ScoreRequest([item_from_proto(i) for i in m.items], m.return_tokens)


def item_from_proto(m: pb.Item) -> ScoreItem:
    """Unset text fields are None; the ids form is whichever item has any ids."""
    ids = bool(m.prompt_ids) or bool(m.response_ids)
    return ScoreItem(
        prompt=m.prompt if m.HasField("prompt") else None,
        response=m.response if m.HasField("response") else None,
        prompt_ids=list(m.prompt_ids) if ids else None,
        response_ids=list(m.response_ids) if ids else None,
        spans=[(s.start, s.end) for s in m.spans] if m.spans else None)


def answer_to_proto(request: ScoreRequest, answer: ScoreAnswer) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        model=answer.model, model_version=answer.model_version,
        results=[result_to_proto(r, request.return_tokens) for r in answer.results],
        usage=pb.Usage(items=len(answer.results), tokens=answer.tokens))


def result_to_proto(r: ItemScore, return_tokens: bool) -> pb.ItemResult:
    out = pb.ItemResult(rewards=r.rewards, total=r.total, token_ids=r.token_ids)
    if r.tokens is not None:
        out.tokens.extend(r.tokens)
    if return_tokens and r.offsets is not None:
        out.offsets.extend(x for pair in r.offsets for x in pair)
    if r.span_rewards is not None:
        out.span_rewards.extend(r.span_rewards)
    return out


def info_to_proto(info: ServiceInfo) -> pb.ModelInfo:
    m, limits = info.model, info.limits
    return pb.ModelInfo(
        name=m.name, kind=m.kind, labels=m.labels, reward_rule=m.reward_rule,
        tokenizer=m.tokenizer, tokenizer_sha256=m.tokenizer_sha256, vocab_size=m.vocab_size,
        max_len=m.max_len, dtype=m.dtype, dtype_delta=m.dtype_delta, device=m.device,
        version=m.version, prefix_reuse=m.prefix_reuse,
        limits=pb.Limits(max_items_per_request=limits.max_items_per_request,
                         max_tokens_per_item=limits.max_tokens_per_item,
                         max_message_bytes=limits.max_message_bytes,
                         max_batch_tokens=limits.max_batch_tokens))


def error_to_proto(exc: ScoringError) -> pb.Error:
    return pb.Error(code=exc.code, message=exc.message, item=exc.item, field=exc.field or "",
                    retry_after_ms=exc.retry_after_ms or 0)


def trailing_metadata(exc: ScoringError) -> tuple[tuple[str, str], ...]:
    """The error's code, item, field and retry hint, for clients that act on them."""
    pairs = [("tokenrm-error-code", exc.code)]
    if exc.item is not None:
        pairs.append(("tokenrm-item", str(exc.item)))
    if exc.field is not None:
        pairs.append(("tokenrm-field", exc.field))
    if exc.retry_after_ms is not None:
        pairs.append(("retry-after-ms", str(exc.retry_after_ms)))
    return tuple(pairs)


async def abort(context: grpc.aio.ServicerContext, exc: ScoringError) -> None:
    await context.abort(STATUS.get(exc.code, grpc.StatusCode.INTERNAL), exc.message,
                        trailing_metadata(exc))
