"""The client's errors: one base class; which are retried is decided in one place (retry.py)."""

from __future__ import annotations


class RewardClientError(Exception):
    """Base of everything the client raises on purpose."""


class InputError(RewardClientError):
    """The server refused an item (or the request) as invalid. Never retried: fix the input.
    `item` is the index in the list given to `score`, when one item is at fault."""

    def __init__(self, message: str, item: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.item, self.field = message, item, field


class AuthenticationError(RewardClientError):
    """The server wants a (different) API key. Never retried."""


class CertificateError(RewardClientError):
    """The server's TLS certificate failed verification (not signed by a trusted root, or not
    for this host). Never retried: another try meets the same certificate. Trust it with
    `root_certificates=` (or SSL_CERT_FILE for https://), or fix the URL."""


class ServerError(RewardClientError):
    """A refusal worth retrying (overloaded, unavailable, draining, unreachable) that outlived
    the retries or the deadline, or a failure of the server itself (HTTP 500, gRPC INTERNAL);
    `retry_after_s` is the server's last hint, if any."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineError(RewardClientError):
    """The call's deadline passed before every item was scored."""


class ResultError(RewardClientError):
    """The server's answer is not what was asked for (wrong number of rewards, non-finite
    values): the results are not returned."""
