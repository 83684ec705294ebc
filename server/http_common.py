"""What every HTTP route shares: the server state and key check as dependencies, JSON answers,
bounded body reading, and parsing bodies with schema errors as domain errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from tokenrm.server import http_schema as schema
from tokenrm.server.errors import BadRequest, InvalidInput, PayloadTooLarge, ScoringError
from tokenrm.server.http_errors import STATUS
from tokenrm.server.service import ScoreAnswer, ScoreRequest
from tokenrm.server.state import ServerState

M = TypeVar("M", bound=BaseModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schema.ErrorResponse} for code in sorted(set(STATUS.values()) - {431})}
# Errors of a route whose own answer is not JSON (GET /metrics): FastAPI would document them in
# the route's media type, but error bodies are always JSON.
JSON_ERRORS: dict[int | str, dict[str, Any]] = {code: {"content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}} for code in ERRORS}


def json_response(content: object, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


async def _state(request: Request) -> ServerState:  # async: no thread hop
    state: ServerState = request.app.state.tokenrm
    return state


State = Annotated[ServerState, Depends(_state)]


async def authorized(request: Request, state: State) -> None:
    state.keys.check(request.headers.get("authorization"))


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


async def handle(request: Request, state: ServerState, transport: str,
                 read: Callable[[bytes], ScoreRequest],
                 respond: Callable[[ScoreRequest, ScoreAnswer], Response]) -> Response:
    """The service's handling of a scoring request whose body `read` turns into a
    ScoreRequest. Once the body is in, a caller that hangs up cancels the work: its rows still
    queued are dropped, not computed (unless the app was made with watch_disconnects=False:
    under Ray Serve, whose proxy does that itself)."""
    body_in = asyncio.Event()

    async def read_request() -> ScoreRequest:
        body = await read_body(request, state.settings.max_body_bytes)
        body_in.set()
        return read(body)

    if not request.app.state.watch_disconnects:
        return await state.service.handle(transport, read_request, respond)
    work = asyncio.ensure_future(state.service.handle(transport, read_request, respond))
    gone = asyncio.ensure_future(_hung_up(request, body_in))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server itself ends this request
        work.cancel()
        raise
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return Response(status_code=499)  # nobody is there to read it


async def _hung_up(request: Request, body_in: asyncio.Event) -> None:
    """Returns when the caller disconnects (after its body is read: the only reader then)."""
    await body_in.wait()
    while (await request.receive())["type"] != "http.disconnect":
        pass


def parse(model: type[M], body: bytes) -> M:
    """`body` as a `model`, or the domain error naming the first thing wrong with it.

    A JSON number with a zero fraction (60.0, 1e2) is an integer as JSON Schema (and so our
    OpenAPI schema) has it; the fast parser takes only 60 for an int field, so a body it refuses
    for such numbers alone is read again with them as ints (a slow path for a rare body)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    wrong = [e for e in errors if not _integral_float(e)]
    if wrong:
        raise invalid(wrong[0])
    try:
        value = json.loads(body)
        for error in errors:
            *path, last = error["loc"]
            container = value
            for key in path:
                container = container[key]
            container[last] = int(error["input"])
    except (ValueError, LookupError, TypeError, RecursionError):  # read otherwise (dup keys)
        raise invalid(errors[0]) from None
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise invalid(exc.errors(include_url=False)[0]) from None


def _integral_float(error: ErrorDetails) -> bool:
    value = error["input"]
    return error["type"] == "int_type" and isinstance(value, float) and value.is_integer()


def invalid(err: ErrorDetails) -> ScoringError:
    """A schema error as a domain error, naming the item and field where there is one."""
    if err["type"] == "json_invalid":
        return BadRequest(f"the body is not valid JSON: {err['msg']}")
    loc = err["loc"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    item = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    field = next((str(p) for p in reversed(loc) if isinstance(p, str)), None)
    return InvalidInput(f"{where or 'body'}: {err['msg']}", item=item, field=field)
