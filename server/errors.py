"""Domain errors of the scoring service, one hierarchy. They know no transport: each adapter
maps `code` to its own statuses, beside itself (http_errors.py, grpc_messages.py)."""

from __future__ import annotations

MAX_RETRY_AFTER_S = 30.0


def retry_hint_s(seconds: float) -> float:
    """A retry hint as callers are told it: within [0.1, 30] s, rounded to 10 ms."""
    return round(min(MAX_RETRY_AFTER_S, max(0.1, seconds)), 2)


class ScoringError(Exception):
    """Base of every error a caller can be told about. `code` is stable and machine-readable."""

    code = "internal"

    def __init__(self, message: str, *, item: int | None = None, field: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.item = item          # index of the offending item in the request, if one is at fault
        self.field = field        # the offending field, e.g. "response_ids"
        self.retry_after_s = None if retry_after_s is None else retry_hint_s(retry_after_s)

    @property
    def retry_after_ms(self) -> int | None:
        return None if self.retry_after_s is None else max(1, round(self.retry_after_s * 1000))

    @property
    def retry_after_whole_s(self) -> int | None:
        """The hint in whole seconds, at least 1 (HTTP's Retry-After takes no fractions)."""
        return None if self.retry_after_s is None else max(1, round(self.retry_after_s))


class BadRequest(ScoringError):
    """The body is not a request: not JSON, not UTF-8, not an object, not a valid message."""

    code = "bad_request"


class InvalidInput(ScoringError):
    """A field breaks the schema or a limit; the message names the item, field and limit."""

    code = "invalid_input"


class Unauthenticated(ScoringError):
    code = "unauthenticated"


class PayloadTooLarge(ScoringError):
    """A body, message or answer over its size limit."""

    code = "payload_too_large"


class HeadersTooLarge(ScoringError):
    """An HTTP request line and headers over their size limit."""

    code = "headers_too_large"


class Overloaded(ScoringError):
    """The queue is full, or holds more work than the request's time allows; try again after
    `retry_after_s`."""

    code = "overloaded"


class Unavailable(ScoringError):
    """Not ready yet, or draining; try again after `retry_after_s`."""

    code = "unavailable"


class DeadlineExceeded(ScoringError):
    """The request's time ran out before its items were scored; they were not computed."""

    code = "deadline_exceeded"
