"""What a request carries and gets back, and the rules every item must keep (both transports
share them): text or ids, spans on text only, ids inside the vocabulary, within the limits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tokenrm.core.encoding import fit
from tokenrm.server.errors import InvalidInput
from tokenrm.server.model import RewardModel


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
class Prepared:
    """An item as the model sees it: `prompt_ids + response_ids`, fitted to the limit."""

    prompt_ids: list[int]
    response_ids: list[int]
    offsets: list[tuple[int, int]] | None


def prepare(model: RewardModel, index: int, item: ScoreItem, max_tokens: int) -> Prepared:
    """Check `item` (the `index`-th of its request) and encode it; InvalidInput names what is
    wrong."""
    check_form(index, item)
    if item.response is not None:
        enc = model.encode(item.prompt or "", item.response)
        prompt_ids, response_ids, offsets = enc.prompt_ids, enc.response_ids, enc.offsets
        field = "response"
        if item.spans is not None:
            check_spans(index, item.spans, len(item.response))
    else:
        prompt_ids, response_ids = list(item.prompt_ids or []), list(item.response_ids or [])
        offsets, field = None, "response_ids"
        check_ids(index, "prompt_ids", prompt_ids, model.info.vocab_size)
        check_ids(index, field, response_ids, model.info.vocab_size)
    if not response_ids:
        raise InvalidInput(f"items[{index}].{field}: empty; give at least one token",
                           item=index, field=field)
    if len(response_ids) > max_tokens:
        raise InvalidInput(f"items[{index}].{field}: {len(response_ids)} tokens; the limit "
                           f"is {max_tokens} tokens per item (a prompt is cut from the left to "
                           f"fit beside the response, a response is not cut)", item=index,
                           field=field)
    prompt_ids, response_ids, _ = fit(prompt_ids, response_ids, max_tokens)
    return Prepared(prompt_ids, response_ids, offsets)


def check_form(index: int, item: ScoreItem) -> None:
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


def check_spans(index: int, spans: Sequence[tuple[int, int]], length: int) -> None:
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


def check_ids(index: int, field: str, ids: list[int], vocab: int) -> None:
    if not ids or (min(ids) >= 0 and max(ids) < vocab):  # the common case, in C
        return
    j, t = next((j, t) for j, t in enumerate(ids) if not 0 <= t < vocab)
    raise InvalidInput(f"items[{index}].{field}[{j}]: token id {t} is outside the "
                       f"vocabulary [0, {vocab})", item=index, field=field)
