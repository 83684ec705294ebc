"""The HTTP adapter: FastAPI routes that translate JSON to the service's types and back."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from tokenrm.server import http_schema as schema
from tokenrm.server.errors import BadRequest, InvalidInput, PayloadTooLarge, ScoringError
from tokenrm.server.http_errors import STATUS, error_response
from tokenrm.server.items import ItemScore, ScoreItem
from tokenrm.server.service import ScoreAnswer, ScoreRequest
from tokenrm.server.state import ServerState

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schema.ErrorResponse} for code in sorted(set(STATUS.values()) - {431})}


def _json(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


async def _state(request: Request) -> ServerState:  # async: no thread hop
    state: ServerState = request.app.state.tokenrm
    return state


State = Annotated[ServerState, Depends(_state)]


async def _authorized(request: Request, state: State) -> None:
    state.keys.check(request.headers.get("authorization"))


# ---------------------------------------------------------------- JSON <-> service types


def request_from_json(body: bytes) -> ScoreRequest:
    try:
        parsed = schema.ScoreRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(exc) from None
    return ScoreRequest([
        ScoreItem(prompt=i.prompt, response=i.response, prompt_ids=i.prompt_ids,
                  response_ids=i.response_ids,
                  spans=None if i.spans is None else [(s[0], s[1]) for s in i.spans])
        for i in parsed.items], parsed.return_tokens)


def _result_json(r: ItemScore, return_tokens: bool) -> dict[str, Any]:
    return {"rewards": r.rewards, "total": r.total, "token_ids": r.token_ids,
            "tokens": r.tokens, "offsets": r.offsets if return_tokens else None,
            "span_rewards": r.span_rewards}


def answer_json(request: ScoreRequest, answer: ScoreAnswer) -> Response:
    return _json({"model": answer.model,
                  "results": [_result_json(r, request.return_tokens) for r in answer.results],
                  "usage": {"items": len(answer.results), "tokens": answer.tokens}})


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


# ---------------------------------------------------------------- routes

router = APIRouter()


@router.get("/healthz", summary="Alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Model loaded and queue accepting",
            dependencies=[Depends(_authorized)], responses=_ERRORS)
async def readyz(state: State) -> Response:
    if not state.service.ready:
        return _json({"status": "not ready"}, 503, {"Retry-After": "1"})
    return _json({"status": "ready", "queued": state.service.engine.queued})


@router.get("/v1/model", response_model=schema.ModelInfoResponse, responses=_ERRORS,
            dependencies=[Depends(_authorized)], summary="The model and the server's limits")
async def model_info(state: State) -> schema.ModelInfoResponse:
    info = state.service.info()
    return schema.ModelInfoResponse(**asdict(info.model), limits=schema.Limits(
        **asdict(info.limits)))


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(_authorized)],
            summary="Prometheus metrics", responses=_ERRORS)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/score", response_model=schema.ScoreResponse, responses=_ERRORS,
             dependencies=[Depends(_authorized)],
             summary="Rewards for every response token of each item",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/ScoreRequest"}}}}})
async def score(request: Request, state: State) -> Response:
    async def read() -> ScoreRequest:
        return request_from_json(await read_body(request, state.settings.max_body_bytes))

    return await state.service.handle("http", read, answer_json)


async def read_body(request: Request, limit: int) -> bytes:
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
    """Routes, the error handler and the schema of /score's body (which the route parses
    itself, for speed and limits), onto an app whose state is set by its lifespan."""
    app.include_router(router)

    @app.exception_handler(ScoringError)
    async def _on_error(request: Request, exc: ScoringError) -> Response:
        return error_response(exc)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes,
                               description=app.description)
            body = schema.ScoreRequest.model_json_schema(
                ref_template="#/components/schemas/{model}")
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["ScoreRequest"] = body
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
