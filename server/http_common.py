"""What every HTTP route shares: the server state and key check as dependencies, JSON answers,
bounded body reading and schema errors as domain errors."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from tokenrm.server import http_schema as schema
from tokenrm.server.errors import BadRequest, InvalidInput, PayloadTooLarge, ScoringError
from tokenrm.server.http_errors import STATUS
from tokenrm.server.state import ServerState

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schema.ErrorResponse} for code in sorted(set(STATUS.values()) - {431})}


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


def invalid(exc: ValidationError) -> ScoringError:
    """The first schema error, naming the item and field where there is one."""
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return BadRequest(f"the body is not valid JSON: {err['msg']}")
    loc = err["loc"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    item = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    field = next((str(p) for p in reversed(loc) if isinstance(p, str)), None)
    return InvalidInput(f"{where or 'body'}: {err['msg']}", item=item, field=field)
