"""Domain errors of the scoring service, one hierarchy; the adapters map them to statuses."""

from __future__ import annotations


class ScoringError(Exception):
    """Base of every error a caller can be told about. `code` is stable and machine-readable."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str, *, item: int | None = None, field: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.item = item          # index of the offending item in the request, if one is at fault
        self.field = field        # the offending field, e.g. "response_ids"
        self.retry_after_s = retry_after_s


class BadRequest(ScoringError):
    """The body is not a request: not JSON, not UTF-8, not an object."""

    code, http_status = "bad_request", 400


class InvalidInput(ScoringError):
    """A field breaks the schema or a limit; the message names the item, field and limit."""

    code, http_status = "invalid_input", 422


class Unauthenticated(ScoringError):
    code, http_status = "unauthenticated", 401


class PayloadTooLarge(ScoringError):
    code, http_status = "payload_too_large", 413


class Overloaded(ScoringError):
    """The queue is full; try again after `retry_after_s`."""

    code, http_status = "overloaded", 429


class Unavailable(ScoringError):
    """Not ready yet, or draining; try again after `retry_after_s`."""

    code, http_status = "unavailable", 503


class DeadlineExceeded(ScoringError):
    """The request's time ran out before its items were scored; they were not computed."""

    code, http_status = "deadline_exceeded", 503
