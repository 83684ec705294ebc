"""The HTTP adapter: FastAPI routes that translate JSON to the service's types and back."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenrm.server import http_schema as schema
from tokenrm.server.errors import ScoringError
from tokenrm.server.http_common import (
    ERRORS,
    JSON_ERRORS,
    State,
    authorized,
    handle,
    json_response,
    parse,
)
from tokenrm.server.http_errors import error_response, route_error_response
from tokenrm.server.http_openrlhf import router as openrlhf_router
from tokenrm.server.items import ItemScore, ScoreItem
from tokenrm.server.service import ScoreAnswer, ScoreRequest

# ---------------------------------------------------------------- JSON <-> service types


def request_from_json(body: bytes) -> ScoreRequest:
    parsed = parse(schema.ScoreRequest, body)
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
    return json_response({
        "model": answer.model, "model_version": answer.model_version,
        "results": [_result_json(r, request.return_tokens) for r in answer.results],
        "usage": {"items": len(answer.results), "tokens": answer.tokens}})


# ---------------------------------------------------------------- routes

router = APIRouter()


@router.get("/healthz", summary="Alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Model loaded and queue accepting",
            response_model=schema.ReadyResponse, dependencies=[Depends(authorized)],
            responses={**ERRORS, 503: {"model": schema.ReadyResponse, "description": "Not "
                                       "ready: retry after Retry-After seconds"}})
async def readyz(state: State) -> Response:
    if not state.service.ready:
        return json_response({"status": "not ready"}, 503, {"Retry-After": "1"})
    return json_response({"status": "ready", "queued": state.service.engine.queued})


@router.get("/v1/model", response_model=schema.ModelInfoResponse, responses=ERRORS,
            dependencies=[Depends(authorized)], summary="The model and the server's limits")
async def model_info(state: State) -> schema.ModelInfoResponse:
    info = state.service.info()
    return schema.ModelInfoResponse(**asdict(info.model), limits=schema.Limits(
        **asdict(info.limits)))


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(authorized)],
            summary="Prometheus metrics", responses=JSON_ERRORS)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/score", response_model=schema.ScoreResponse, responses=ERRORS,
             dependencies=[Depends(authorized)],
             summary="Rewards for every response token of each item",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/ScoreRequest"}}}}})
async def score(request: Request, state: State) -> Response:
    return await handle(request, state, "http", request_from_json, answer_json)


def request_schemas(spec: dict[str, Any]) -> dict[str, Any]:
    """Add the schemas of the bodies that routes parse themselves (for speed and limits) to
    the OpenAPI `spec`, which refers to them by name."""
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (schema.ScoreRequest, schema.GetRewardRequest):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    return spec


def add_http_api(app: FastAPI) -> None:
    """Routes, the error handler and the OpenAPI schema (with the running model's limits once
    it is loaded) onto an app whose state is set by its lifespan."""
    app.include_router(router)
    app.include_router(openrlhf_router)

    @app.exception_handler(ScoringError)
    async def _on_error(request: Request, exc: ScoringError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_route_error(request: Request, exc: StarletteHTTPException) -> Response:
        return route_error_response(request.method, request.url.path, exc.status_code,
                                    exc.headers)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = request_schemas(get_openapi(
                title=app.title, version=app.version, routes=app.routes,
                description=app.description))
        state = getattr(app.state, "tokenrm", None)  # None: not started (no model loaded)
        if state is None:
            return app.openapi_schema
        info = state.service.info()  # the model can be replaced while serving: not cached
        return schema.with_limits(app.openapi_schema,
                                  max_items=info.limits.max_items_per_request,
                                  max_tokens=info.limits.max_tokens_per_item,
                                  vocab_size=info.model.vocab_size)

    app.openapi = openapi  # type: ignore[method-assign]
