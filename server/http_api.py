"""The HTTP adapter: FastAPI routes that translate JSON to the service's types and back."""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from tokenrm.server.errors import BadRequest, InvalidInput, PayloadTooLarge, ScoringError
from tokenrm.server.protocol import (
    ErrorResponse,
    Limits,
    ModelInfoResponse,
    ScoreRequest,
    ScoreResponse,
)
from tokenrm.server.service import ItemScore, ScoreItem
from tokenrm.server.state import ServerState

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429, 503)}


def _json(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(exc: ScoringError) -> Response:
    body = {"code": exc.code, "message": exc.message, "item": exc.item, "field": exc.field}
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if exc.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return _json({"error": body}, exc.http_status, headers)


async def _state(request: Request) -> ServerState:  # async: no thread hop
    state: ServerState = request.app.state.tokenrm
    return state


State = Annotated[ServerState, Depends(_state)]


async def _authorized(request: Request, state: State) -> None:
    state.keys.check(request.headers.get("authorization"))


def _item_from_json(item: Any) -> ScoreItem:
    return ScoreItem(prompt=item.prompt, response=item.response, prompt_ids=item.prompt_ids,
                     response_ids=item.response_ids,
                     spans=None if item.spans is None else [tuple(s) for s in item.spans])


def _result_to_json(r: ItemScore, return_tokens: bool) -> dict[str, Any]:
    return {"rewards": r.rewards, "total": r.total, "token_ids": r.token_ids,
            "tokens": r.tokens,
            "offsets": r.offsets if return_tokens else None,
            "span_rewards": r.span_rewards}


def _invalid(exc: ValidationError) -> ScoringError:
    """The first schema error, naming the item and field where there is one."""
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return BadRequest(f"the body is not valid JSON: {err['msg']}")
    loc = err["loc"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    item = loc[1] if len(loc) > 1 and loc[0] == "items" and isinstance(loc[1], int) else None
    field = next((str(p) for p in reversed(loc) if isinstance(p, str)), None)
    return InvalidInput(f"{where or 'body'}: {err['msg']}", item=item, field=field)


router = APIRouter()


@router.get("/healthz", summary="Alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Model loaded and queue accepting",
            dependencies=[Depends(_authorized)], responses=_ERRORS)
async def readyz(state: State) -> Response:
    if not state.ready:
        return _json({"status": "not ready"}, 503, {"Retry-After": "1"})
    return _json({"status": "ready", "queued": state.engine.queued})


@router.get("/v1/model", response_model=ModelInfoResponse, responses=_ERRORS,
            dependencies=[Depends(_authorized)], summary="The model and the server's limits")
async def model_info(state: State) -> ModelInfoResponse:
    info, s = state.model.info, state.settings
    return ModelInfoResponse(
        name=info.name, kind=info.kind, labels=list(info.labels), reward_rule=info.reward_rule,
        tokenizer=info.tokenizer, tokenizer_sha256=info.tokenizer_sha256,
            vocab_size=info.vocab_size, max_len=info.max_len,
        dtype=info.dtype, device=info.device,
        limits=Limits(max_items_per_request=s.max_items_per_request,
                      max_tokens_per_item=state.service.limits.max_tokens_per_item,
                      max_body_bytes=s.max_body_bytes, max_batch_tokens=s.max_batch_tokens))


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(_authorized)],
            summary="Prometheus metrics", responses=_ERRORS)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/score", response_model=ScoreResponse, responses=_ERRORS,
             dependencies=[Depends(_authorized)],
             summary="Rewards for every response token of each item",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/ScoreRequest"}}}}})
async def score(request: Request, state: State) -> Response:
    started = time.perf_counter()
    state.service.admit()
    body = await _read_body(request, state.settings.max_body_bytes)
    try:
        parsed = ScoreRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(exc) from None
    results, tokens = await state.service.score([_item_from_json(i) for i in parsed.items],
                                                parsed.return_tokens)
    state.metrics.request_seconds.labels("http").observe(time.perf_counter() - started)
    state.metrics.requests.labels("http", "ok").inc()
    return _json({"model": state.model.info.name,
                  "results": [_result_to_json(r, parsed.return_tokens) for r in results],
                  "usage": {"items": len(results), "tokens": tokens}})


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def add_http_api(app: FastAPI) -> None:
    """Routes, the error handler and the request schema, onto an app whose state is set."""
    app.include_router(router)

    @app.exception_handler(ScoringError)
    async def _on_error(request: Request, exc: ScoringError) -> Response:
        state: ServerState | None = getattr(request.app.state, "tokenrm", None)
        if state is not None:
            state.metrics.requests.labels("http", exc.code).inc()
        return error_response(exc)
