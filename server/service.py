"""The RewardService: the one façade every front door calls. A request is admitted before its
body is read, read by the adapter's own function, scored, answered by the adapter's own
function, and its outcome and latency recorded, all here; adapters only translate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from tokenrm.core.spans import span_rewards
from tokenrm.server.engine import Row, ScoringEngine
from tokenrm.server.errors import DeadlineExceeded, InvalidInput, ScoringError
from tokenrm.server.items import ItemScore, Prepared, ScoreItem, prepare
from tokenrm.server.metrics import RequestMetrics
from tokenrm.server.model import ModelInfo

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    max_items_per_request: int
    max_tokens_per_item: int      # prompt + response
    request_timeout_s: float      # queue + forward, unless the caller's deadline is sooner
    max_body_bytes: int           # HTTP
    max_message_bytes: int        # gRPC, received and sent
    max_batch_tokens: int


@dataclass(frozen=True)
class ServiceInfo:
    """What GET /v1/model and GetModelInfo tell: the model and the limits."""

    model: ModelInfo
    limits: Limits


@dataclass(frozen=True)
class ScoreRequest:
    items: Sequence[ScoreItem]
    return_tokens: bool = False   # token strings (and, over the wire, offsets) in the answer
    allow_empty: bool = False     # no items: an empty answer (OpenRLHF's protocol), not an error


@dataclass(frozen=True)
class ScoreAnswer:
    model: str                    # the name of the model that scored it
    model_version: str            # and its version
    results: list[ItemScore]      # one per item, in order
    tokens: int                   # model input tokens, prompts included


class RewardService:
    def __init__(self, engine: ScoringEngine, limits: Limits, metrics: RequestMetrics) -> None:
        self.engine, self.limits, self.metrics = engine, limits, metrics
        self.model = engine.model
        self.in_flight = 0  # requests inside `handle`

    @property
    def ready(self) -> bool:
        return self.engine.ready

    def info(self) -> ServiceInfo:
        return ServiceInfo(self.model.info, self.limits)

    async def handle(self, transport: str, read: Callable[[], Awaitable[ScoreRequest]],
                     respond: Callable[[ScoreRequest, ScoreAnswer], T],
                     remaining_s: float | None = None) -> T:
        """One request from start to end: refused at once if the queue could not let it
        finish in time (before `read` parses anything), then read, scored and answered.
        `remaining_s`: the caller's own deadline, if it set one. Raises ScoringError."""
        started = time.perf_counter()
        self.in_flight += 1
        try:
            timeout_s = self._timeout_s(remaining_s)
            self.engine.admit(timeout_s)
            request = await read()
            out = respond(request, await self.score(request, timeout_s))
        except ScoringError as exc:
            self.metrics.observe(transport, exc.code)
            raise
        except asyncio.CancelledError:  # the caller went away (or the server stops it)
            self.metrics.observe(transport, "cancelled")
            raise
        finally:
            self.in_flight -= 1
        self.metrics.observe(transport, "ok", time.perf_counter() - started)
        return out

    async def score(self, request: ScoreRequest, timeout_s: float) -> ScoreAnswer:
        """Score the items in order (no admission, no metrics: see `handle`)."""
        items = request.items
        if not items and request.allow_empty:
            return ScoreAnswer(self.model.info.name, self.model.info.version, [], 0)
        if not items:
            raise InvalidInput("items: at least one item is required", field="items")
        if len(items) > self.limits.max_items_per_request:
            raise InvalidInput(f"items: {len(items)} items; the limit is "
                               f"{self.limits.max_items_per_request} per request", field="items")
        if any(it.response is not None for it in items):  # tokenizing text: off the loop
            prepared = await asyncio.to_thread(self._prepare_all, items)
        else:
            prepared = self._prepare_all(items)
        rows = [Row(p.prompt_ids + p.response_ids, len(p.response_ids)) for p in prepared]
        rewards = await self.engine.score(rows, timeout_s)
        results = [self._result(it, p, r, request.return_tokens)
                   for it, p, r in zip(items, prepared, rewards, strict=True)]
        return ScoreAnswer(self.model.info.name, self.model.info.version, results,
                           sum(len(r.input_ids) for r in rows))

    def _timeout_s(self, remaining_s: float | None) -> float:
        if remaining_s is None:
            return self.limits.request_timeout_s
        if remaining_s <= 0:
            raise DeadlineExceeded("the call's deadline has passed",
                                   retry_after_s=self.engine.expected_wait_s())
        return min(self.limits.request_timeout_s, remaining_s)

    def _prepare_all(self, items: Sequence[ScoreItem]) -> list[Prepared]:
        limit = self.limits.max_tokens_per_item
        return [prepare(self.model, i, it, limit) for i, it in enumerate(items)]

    def _result(self, item: ScoreItem, p: Prepared, rewards: np.ndarray,
                return_tokens: bool) -> ItemScore:
        tokenizer = self.model.tokenizer
        return ItemScore(
            rewards=rewards, token_ids=p.response_ids, offsets=p.offsets,
            tokens=tokenizer.convert_ids_to_tokens(p.response_ids) if return_tokens else None,
            span_rewards=None if item.spans is None or p.offsets is None
            else span_rewards(p.offsets, rewards, item.spans))
