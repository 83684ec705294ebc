"""Domain errors as HTTP answers: the status of each error code, and the JSON error body."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from fastapi.responses import Response

from tokenrm.server.errors import ScoringError

STATUS = {
    "bad_request": 400,
    "unauthenticated": 401,
    "payload_too_large": 413,
    "invalid_input": 422,
    "overloaded": 429,
    "headers_too_large": 431,
    "unavailable": 503,
    "deadline_exceeded": 503,
}


def error_body(exc: ScoringError) -> bytes:
    return _body(exc.code, exc.message, exc.item, exc.field)


def _body(code: str, message: str, item: int | None = None, field: str | None = None) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "item": item,
                                   "field": field}})


def error_headers(exc: ScoringError) -> dict[str, str]:
    headers = {}
    if exc.retry_after_whole_s is not None:
        headers["Retry-After"] = str(exc.retry_after_whole_s)
    if exc.code == "unauthenticated":
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_response(exc: ScoringError) -> Response:
    return Response(error_body(exc), status_code=STATUS.get(exc.code, 500),
                    media_type="application/json", headers=error_headers(exc))


def route_error_response(method: str, path: str, status: int,
                         headers: Mapping[str, str] | None) -> Response:
    """A request no route takes (404, 405 with Allow, ...), in the same error body as the rest."""
    allowed = {k.lower(): v for k, v in (headers or {}).items()}.get("allow", "")
    code, message = {
        404: ("not_found", "nothing at this path (the routes are in the README)"),
        405: ("method_not_allowed",
              f"{method} is not allowed on {path}; allowed: {allowed}"),
    }.get(status, ("bad_request", f"{method} {path}: refused ({status})"))
    return Response(_body(code, message), status_code=status, media_type="application/json",
                    headers=dict(headers or {}))
