"""POST /score and GET /v1/model over httpx, errors mapped to the client's."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np

from tokenrm.client.errors import (
    AuthenticationError,
    CertificateError,
    InputError,
    ResultError,
    ServerError,
)
from tokenrm.client.retry import Retryable
from tokenrm.client.types import Item, ItemScore, Limits, ModelInfo

RETRY_STATUSES = {429, 502, 503, 504}
BUSY_STATUSES = {429}  # retried on the same endpoint; the others take it out of the rotation


class HttpTransport:
    def __init__(self, url: str, api_key: str | None, verify: bool | ssl.SSLContext = True
                 ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, verify=verify,
                                       limits=httpx.Limits(max_keepalive_connections=32))

    async def model_info(self, timeout_s: float) -> ModelInfo:
        body = await self._request("GET", "/v1/model", None, timeout_s)
        with _tokenrm_answer(f"{self.url}/v1/model"):
            limits = body["limits"]
            return ModelInfo(
                name=body["name"], kind=body["kind"], labels=tuple(body["labels"]),
                reward_rule=body["reward_rule"], vocab_size=body["vocab_size"],
                max_len=body["max_len"],
                limits=Limits(max_items_per_request=limits["max_items_per_request"],
                              max_tokens_per_item=limits["max_tokens_per_item"],
                              max_request_bytes=limits["max_body_bytes"]),
                tokenizer_sha256=body.get("tokenizer_sha256", ""),
                version=body.get("version", ""))

    async def score(self, items: Sequence[Item], return_tokens: bool,
                    timeout_s: float) -> list[ItemScore]:
        request = {"items": [_item_json(it) for it in items], "return_tokens": return_tokens}
        body = await self._request("POST", "/score", request, timeout_s)
        with _tokenrm_answer(f"{self.url}/score"):
            return [_score(r) for r in body["results"]]

    async def healthy(self, timeout_s: float) -> bool:
        try:
            return (await self._http.get("/readyz", timeout=timeout_s)).status_code == 200
        except httpx.HTTPError:
            return False

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, payload: dict[str, Any] | None,
                       timeout_s: float) -> Any:
        try:
            response = await self._http.request(method, path, json=payload, timeout=timeout_s)
        except httpx.TransportError as exc:  # refused, reset, timed out: worth another try
            if _certificate_failed(exc):
                raise CertificateError(f"{self.url}: {exc} (trust the server's certificate with "
                                       f"root_certificates= or SSL_CERT_FILE)") from exc
            raise Retryable(f"{self.url}: {type(exc).__name__}: {exc}",
                            endpoint_down=True) from exc
        if response.status_code == 200:
            with _tokenrm_answer(f"{self.url}{path}"):
                return response.json()
        error = _error_body(response)
        detail = error.get("message", "")
        if error.get("code"):
            detail = f"{error['code']}: {detail}"
        message = f"{self.url}{path}: {response.status_code} {detail}".strip()
        if response.status_code in RETRY_STATUSES:
            raise Retryable(message, _retry_after(response),
                            endpoint_down=response.status_code not in BUSY_STATUSES)
        if response.status_code == 401:
            raise AuthenticationError(message)
        if response.status_code == 500 and not error.get("code"):
            # Not tokenrm's answer: something in front of the model failed (Ray Serve's
            # proxy when the replica it chose dies). Scoring is idempotent: another try.
            raise Retryable(message)
        if response.status_code >= 500:  # a failure of the server, not of the input
            raise ServerError(message)
        raise InputError(message, error.get("item"), error.get("field"))


def _certificate_failed(exc: BaseException) -> bool:
    """Did the TLS handshake fail on the server's certificate (anywhere in the cause chain)?"""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in chain)


def _item_json(item: Item) -> dict[str, Any]:
    if item.response is not None:
        out: dict[str, Any] = {"prompt": item.prompt or "", "response": item.response}
        if item.spans is not None:
            out["spans"] = [list(span) for span in item.spans]
        return out
    return {"prompt_ids": list(item.prompt_ids or []),
            "response_ids": list(item.response_ids or [])}


def _score(r: dict[str, Any]) -> ItemScore:
    offsets, tokens, spans = r.get("offsets"), r.get("tokens"), r.get("span_rewards")
    return ItemScore(
        rewards=np.asarray(r["rewards"], dtype=np.float32),
        token_ids=np.asarray(r["token_ids"], dtype=np.int64),
        offsets=None if offsets is None else np.asarray(offsets, dtype=np.int64).reshape(-1, 2),
        tokens=None if tokens is None else [str(t) for t in tokens],
        span_rewards=None if spans is None else np.asarray(spans, dtype=np.float32),
        total=float(r["total"]))


@contextlib.contextmanager
def _tokenrm_answer(where: str) -> Iterator[None]:
    """A 200 answer that is not the JSON a tokenrm server sends (another server at this URL,
    say) is a ResultError, not a KeyError from deep inside."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ResultError(f"{where}: not a tokenrm answer ({type(exc).__name__}: {exc})"
                          ) from None


def _error_body(response: httpx.Response) -> dict[str, Any]:
    try:
        error = response.json().get("error")
    except ValueError:
        return {"message": response.text[:200]}
    return error if isinstance(error, dict) else {}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: not sent by tokenrm; wait the backoff instead
        return None
