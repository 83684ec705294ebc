"""AsyncRewardClient: split, send, retry, check and reorder; the transports do the wire work."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import SplitResult, urlsplit

import grpc
import numpy as np

from tokenrm.client.errors import DeadlineError, InputError, ResultError, ServerError
from tokenrm.client.grpc_transport import GrpcTransport
from tokenrm.client.http_transport import HttpTransport
from tokenrm.client.pool import Endpoint, Pool, Transport
from tokenrm.client.retry import Retryable, RetryPolicy
from tokenrm.client.types import Item, ItemScore, ModelInfo, as_item

BYTES_PER_TOKEN = 8         # a token id or a character's worth of JSON, generously
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def checked_url(url: str) -> SplitResult:
    """`url`'s parts, or ValueError when it is not one a client can use."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "grpc", "grpcs") or not parts.netloc:
        raise ValueError(f"{url!r}: the URL must start with http://, https://, grpc:// or "
                         "grpcs://")
    return parts


def make_transport(url: str, api_key: str | None, root_certificates: bytes | None) -> Transport:
    """http:// and https:// speak HTTP (a URL may name the /score endpoint: the server is the
    rest); grpc:// plaintext gRPC; grpcs:// gRPC over TLS."""
    parts = checked_url(url)
    if parts.scheme in ("http", "https"):
        verify: bool | ssl.SSLContext = True
        if parts.scheme == "https" and root_certificates is not None:
            verify = ssl.create_default_context(cadata=root_certificates.decode())
        return HttpTransport(url.rstrip("/").removesuffix("/score"), api_key, verify)
    credentials = grpc.ssl_channel_credentials(root_certificates) \
        if parts.scheme == "grpcs" else None
    return GrpcTransport(parts.netloc, api_key, credentials, MAX_MESSAGE_BYTES)


class AsyncRewardClient:
    """Per-token rewards from one or several tokenrm servers (see the package docstring).

    url: one URL or a list (requests go to the live endpoint with the fewest in flight).
    timeout_s: the default deadline of one `score` call, retries included.
    max_in_flight: requests of one `score` call in flight at once.
    items_per_request: at most this many items per request (the server's limit applies too).
    """

    def __init__(self, url: str | Sequence[str], *, api_key: str | None = None,
                 timeout_s: float = 60.0, max_in_flight: int = 4,
                 items_per_request: int | None = None, retry: RetryPolicy | None = None,
                 root_certificates: bytes | None = None) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("url: give at least one URL")
        if max_in_flight < 1 or (items_per_request is not None and items_per_request < 1):
            raise ValueError("max_in_flight and items_per_request must be at least 1")
        self.timeout_s, self.max_in_flight = timeout_s, max_in_flight
        self.items_per_request = items_per_request
        self.retry = retry or RetryPolicy()
        self._endpoints = [Endpoint(u, make_transport(u, api_key, root_certificates))
                           for u in urls]
        self._pool: Pool | None = None
        self._info: ModelInfo | None = None

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._get_pool().close()

    async def model_info(self, timeout_s: float | None = None) -> ModelInfo:
        """The served model and its limits (asked once, then remembered)."""
        if self._info is None:
            deadline = time.monotonic() + (timeout_s or self.timeout_s)
            self._info = await self._with_retries(
                lambda e, t: e.transport.model_info(t), deadline)
        return self._info

    async def score(self, items: Sequence[Item | Mapping[str, Any]], *,
                    return_tokens: bool = False, timeout_s: float | None = None
                    ) -> list[ItemScore]:
        """Scores of `items` (Items, or dicts of the JSON item shape), in order.
        `return_tokens`: also each token's string (`tokens`) and, for text items, its character
        span (`offsets`). Raises TypeError (an item of another kind), InputError (naming the
        item), AuthenticationError, CertificateError (every endpoint's TLS certificate failed
        verification), ServerError (retries exhausted), DeadlineError, ResultError."""
        checked = [as_item(i, item) for i, item in enumerate(items)]
        if not checked:
            return []
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        info = await self.model_info(max(0.001, deadline - time.monotonic()))
        chunks = self._split(checked, info)
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(start: int, chunk: Sequence[Item]) -> list[ItemScore]:
            async with gate:
                try:
                    scores = await self._with_retries(
                        lambda e, t: e.transport.score(chunk, return_tokens, t), deadline)
                except InputError as exc:  # name the item by its index in the caller's list
                    if exc.item is None:
                        raise
                    item = start + exc.item
                    message = exc.message.replace(f"items[{exc.item}]", f"items[{item}]", 1)
                    raise InputError(message, item, exc.field) from None
            return [_checked(start + i, it, s) for i, (it, s) in
                    enumerate(zip(chunk, _same_length(start, chunk, scores), strict=True))]

        tasks = [asyncio.create_task(one(start, chunk)) for start, chunk in chunks]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # the first failure ends the call: stop the rest
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return [score for chunk in results for score in chunk]

    def _split(self, items: Sequence[Item], info: ModelInfo) -> list[tuple[int, list[Item]]]:
        """Consecutive runs of items under the item and byte limits, with their start index."""
        per_request = min(info.limits.max_items_per_request,
                          self.items_per_request or info.limits.max_items_per_request)
        budget = info.limits.max_request_bytes // 2  # JSON and answers are bigger than guessed
        chunks: list[tuple[int, list[Item]]] = []
        size = 0
        for i, item in enumerate(items):
            cost = _estimated_bytes(item)
            if not chunks or len(chunks[-1][1]) >= per_request or size + cost > budget:
                chunks.append((i, []))
                size = 0
            chunks[-1][1].append(item)
            size += cost
        return chunks

    async def _with_retries(self, call, deadline: float):  # type: ignore[no-untyped-def]
        """`call(endpoint, timeout_s)` until it succeeds, a non-retryable error, the retry
        policy gives up (ServerError) or the deadline passes (DeadlineError)."""
        pool = self._get_pool()
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineError("the call's deadline passed before it was answered")
            try:
                async with pool.use() as endpoint:
                    return await call(endpoint, left)
            except Retryable as exc:
                if self.retry.gives_up(attempt):
                    raise ServerError(f"gave up after {attempt} attempts: {exc.message}",
                                      exc.retry_after_s) from None
                wait = self.retry.delay_s(attempt - 1, exc.retry_after_s)
                if time.monotonic() + wait >= deadline:
                    raise DeadlineError(f"the call's deadline passed while retrying (last: "
                                        f"{exc.message})") from None
                if all(not e.up for e in pool.endpoints):
                    await pool.wait_for_change(wait)
                else:
                    await asyncio.sleep(wait)

    def _get_pool(self) -> Pool:
        if self._pool is None:  # created inside the event loop that uses it
            self._pool = Pool(self._endpoints, self.retry)
        return self._pool


def _estimated_bytes(item: Item) -> int:
    text = len(item.prompt or "") + len(item.response or "")
    ids = len(item.prompt_ids or ()) + len(item.response_ids or ())
    return 64 + BYTES_PER_TOKEN * (text + ids + 2 * len(item.spans or ()))


def _same_length(start: int, chunk: Sequence[Item],
                 scores: Sequence[ItemScore]) -> Sequence[ItemScore]:
    if len(scores) != len(chunk):
        raise ResultError(f"items[{start}:{start + len(chunk)}]: the server answered "
                          f"{len(scores)} results for {len(chunk)} items")
    return scores


def _checked(index: int, item: Item, score: ItemScore) -> ItemScore:
    """The score, if it is what the item asked for: else ResultError naming the item."""
    n = len(score.rewards)
    problems = []
    if item.response_ids is not None and n != len(item.response_ids):
        problems.append(f"{n} rewards for {len(item.response_ids)} response tokens")
    if len(score.token_ids) != n:
        problems.append(f"{n} rewards for {len(score.token_ids)} token ids")
    if score.offsets is not None and len(score.offsets) != n:
        problems.append(f"{len(score.offsets)} offsets for {n} rewards")
    if score.tokens is not None and len(score.tokens) != n:
        problems.append(f"{len(score.tokens)} tokens for {n} rewards")
    span_rewards = score.span_rewards
    if item.spans is not None:
        span_rewards = np.zeros(0, np.float32) if span_rewards is None else span_rewards
        if len(span_rewards) != len(item.spans):
            problems.append(f"{len(span_rewards)} span rewards for {len(item.spans)} spans")
    if not np.all(np.isfinite(score.rewards)) or not math.isfinite(score.total):
        problems.append("non-finite rewards")
    if problems:
        raise ResultError(f"items[{index}]: the server's answer is wrong: "
                          + "; ".join(problems))
    if span_rewards is score.span_rewards:
        return score
    return dataclasses.replace(score, span_rewards=span_rewards)
