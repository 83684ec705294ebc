"""The scoring service both adapters call: checks items, encodes them, awaits the engine, and
assembles per-item results. HTTP and gRPC only translate to and from these types."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tokenrm.core.encoding import fit
from tokenrm.core.spans import span_rewards
from tokenrm.server.engine import Row, ScoringEngine
from tokenrm.server.errors import InvalidInput


@dataclass(frozen=True)
class ScoreItem:
    """Text (prompt, response, optional spans) or ids (prompt_ids, response_ids)."""

    prompt: str | None = None
    response: str | None = None
    prompt_ids: Sequence[int] | None = None
    response_ids: Sequence[int] | None = None
    spans: Sequence[tuple[int, int]] | None = None


@dataclass(frozen=True)
class ItemScore:
    rewards: np.ndarray                      # float32, one per response token
    token_ids: list[int]
    offsets: list[tuple[int, int]] | None    # text items
    tokens: list[str] | None                 # when asked for
    span_rewards: np.ndarray | None          # when spans were given

    @property
    def total(self) -> float:
        return float(self.rewards.sum(dtype=np.float64))


@dataclass(frozen=True)
class ServiceLimits:
    max_items_per_request: int
    max_tokens_per_item: int
    request_timeout_s: float


@dataclass(frozen=True)
class _Prepared:
    prompt_ids: list[int]
    response_ids: list[int]
    offsets: list[tuple[int, int]] | None


class RewardService:
    def __init__(self, engine: ScoringEngine, limits: ServiceLimits) -> None:
        self.engine, self.limits = engine, limits
        self.model = engine.model

    def admit(self, timeout_s: float | None = None) -> None:
        """Refuse now (Overloaded, Unavailable) when a request could not be scored in time,
        before the caller's body is even parsed."""
        self.engine.admit(timeout_s or self.limits.request_timeout_s)

    async def score(self, items: Sequence[ScoreItem], return_tokens: bool = False,
                    timeout_s: float | None = None) -> tuple[list[ItemScore], int]:
        """Score items in order; returns the results and the model input tokens used."""
        if not items:
            raise InvalidInput("items: at least one item is required", field="items")
        if len(items) > self.limits.max_items_per_request:
            raise InvalidInput(f"items: {len(items)} items; the limit is "
                               f"{self.limits.max_items_per_request} per request", field="items")
        if any(it.response is not None for it in items):
            prepared = await asyncio.to_thread(self._prepare_all, items)
        else:
            prepared = self._prepare_all(items)
        rows = [Row(p.prompt_ids + p.response_ids, len(p.response_ids)) for p in prepared]
        rewards = await self.engine.score(rows, timeout_s or self.limits.request_timeout_s)
        results = [self._result(it, p, r, return_tokens)
                   for it, p, r in zip(items, prepared, rewards, strict=True)]
        return results, sum(len(r.input_ids) for r in rows)

    def _prepare_all(self, items: Sequence[ScoreItem]) -> list[_Prepared]:
        return [self._prepare(i, it) for i, it in enumerate(items)]

    def _prepare(self, index: int, item: ScoreItem) -> _Prepared:
        _check_form(index, item)
        if item.response is not None:
            enc = self.model.encode(item.prompt or "", item.response)
            prompt_ids, response_ids, offsets = enc.prompt_ids, enc.response_ids, enc.offsets
            field = "response"
            if item.spans is not None:
                _check_spans(index, item.spans, len(item.response))
        else:
            prompt_ids, response_ids = list(item.prompt_ids or []), list(item.response_ids or [])
            offsets, field = None, "response_ids"
            self._check_ids(index, "prompt_ids", prompt_ids)
            self._check_ids(index, field, response_ids)
        limit = self.limits.max_tokens_per_item
        if not response_ids:
            raise InvalidInput(f"items[{index}].{field}: empty; give at least one token",
                               item=index, field=field)
        if len(response_ids) > limit:
            raise InvalidInput(f"items[{index}].{field}: {len(response_ids)} tokens; the limit "
                               f"is {limit} per item, prompt included", item=index, field=field)
        prompt_ids, response_ids, _ = fit(prompt_ids, response_ids, limit)
        return _Prepared(prompt_ids, response_ids, offsets)

    def _check_ids(self, index: int, field: str, ids: list[int]) -> None:
        vocab = self.model.info.vocab_size
        if not ids or (min(ids) >= 0 and max(ids) < vocab):  # the common case, in C
            return
        j, t = next((j, t) for j, t in enumerate(ids) if not 0 <= t < vocab)
        raise InvalidInput(f"items[{index}].{field}[{j}]: token id {t} is outside the "
                           f"vocabulary [0, {vocab})", item=index, field=field)

    def _result(self, item: ScoreItem, p: _Prepared, rewards: np.ndarray,
                return_tokens: bool) -> ItemScore:
        tokenizer = self.model.tokenizer
        return ItemScore(
            rewards=rewards, token_ids=p.response_ids, offsets=p.offsets,
            tokens=tokenizer.convert_ids_to_tokens(p.response_ids) if return_tokens else None,
            span_rewards=None if item.spans is None or p.offsets is None
            else span_rewards(p.offsets, rewards, item.spans))


def _check_form(index: int, item: ScoreItem) -> None:
    """Text (prompt and response, spans optional) or ids (prompt_ids and response_ids)."""
    text = item.prompt is not None or item.response is not None
    ids = item.prompt_ids is not None or item.response_ids is not None
    if text and ids:
        raise InvalidInput(f"items[{index}]: give text (prompt, response) or ids (prompt_ids, "
                           "response_ids), not both", item=index)
    if ids:
        missing = "prompt_ids" if item.prompt_ids is None else "response_ids"
        if item.prompt_ids is None or item.response_ids is None:
            raise InvalidInput(f"items[{index}].{missing}: an ids item needs both prompt_ids "
                               "and response_ids", item=index, field=missing)
        if item.spans is not None:
            raise InvalidInput(f"items[{index}].spans: spans apply to text items only",
                               item=index, field="spans")
    elif item.prompt is None or item.response is None:
        missing = "prompt" if item.prompt is None else "response"
        raise InvalidInput(f"items[{index}].{missing}: an item needs prompt and response (or "
                           "prompt_ids and response_ids)", item=index, field=missing)


def _check_spans(index: int, spans: Sequence[tuple[int, int]], length: int) -> None:
    previous_end = 0
    for j, (start, end) in enumerate(spans):
        if not 0 <= start < end <= length:
            raise InvalidInput(f"items[{index}].spans[{j}]: [{start}, {end}) must satisfy "
                               f"0 <= start < end <= {length} (the response length)",
                               item=index, field="spans")
        if start < previous_end:
            raise InvalidInput(f"items[{index}].spans[{j}]: spans must be sorted and must not "
                               "overlap", item=index, field="spans")
        previous_end = end
