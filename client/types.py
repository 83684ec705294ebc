"""What a caller gives the client and gets back: items in, per-item scores out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Item:
    """One (prompt, response) to score: text, or the exact token ids of the model input.

    Build it with `Item.text(...)` or `Item.tokens(...)`. For a policy whose tokenizer is not the
    reward model's, give a text item `spans`: the character span [start, end) of each policy
    token in `response`; the score then carries one reward per span (`span_rewards`).
    """

    prompt: str | None = None
    response: str | None = None
    prompt_ids: Sequence[int] | None = None
    response_ids: Sequence[int] | None = None
    spans: Sequence[tuple[int, int]] | None = None

    @classmethod
    def text(cls, prompt: str, response: str,
             spans: Sequence[tuple[int, int]] | None = None) -> Item:
        return cls(prompt=prompt, response=response,
                   spans=None if spans is None else [(int(a), int(b)) for a, b in spans])

    @classmethod
    def tokens(cls, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Item:
        return cls(prompt_ids=[int(t) for t in prompt_ids],
                   response_ids=[int(t) for t in response_ids])


TEXT_KEYS, IDS_KEYS = {"prompt", "response", "spans"}, {"prompt_ids", "response_ids"}
ACCEPTED = ("an Item (Item.text, Item.tokens) or a dict of the JSON item shape: "
            "{'prompt', 'response'[, 'spans']} or {'prompt_ids', 'response_ids'}")


def as_item(index: int, value: object) -> Item:
    """`value` as an Item: an Item as it is, or a dict of the JSON API's item shape; anything
    else is a TypeError naming the item and what is accepted."""
    if isinstance(value, Item):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"items[{index}]: a {type(value).__name__}; give {ACCEPTED}")
    keys = set(value)
    if "response" in keys and keys <= TEXT_KEYS:
        return Item.text(value.get("prompt") or "", value["response"], value.get("spans"))
    if "response_ids" in keys and keys <= IDS_KEYS:
        return Item.tokens(value.get("prompt_ids") or (), value["response_ids"])
    raise TypeError(f"items[{index}]: a dict with keys {sorted(keys)}; give {ACCEPTED}")


@dataclass(frozen=True)
class ItemScore:
    """The rewards of one item, whichever transport brought them; named as on the wire."""

    rewards: np.ndarray                  # float32, one per response token of the reward model
    token_ids: np.ndarray                # int64, the response tokens that were scored
    offsets: np.ndarray | None           # int64 (n, 2): character span of each token (text
                                         # items, with return_tokens)
    tokens: list[str] | None             # the token strings (with return_tokens)
    span_rewards: np.ndarray | None      # float32, one per span of the item (with spans)
    total: float                         # sum of rewards (float64)


@dataclass(frozen=True)
class Limits:
    max_items_per_request: int
    max_tokens_per_item: int
    max_request_bytes: int               # HTTP body or gRPC message


@dataclass(frozen=True)
class ModelInfo:
    """The served model, as GET /v1/model or GetModelInfo describe it."""

    name: str
    kind: str
    labels: tuple[str, ...]
    reward_rule: str
    vocab_size: int
    max_len: int
    limits: Limits
    tokenizer_sha256: str = ""       # equal to your tokenizer's: you may send token ids
    version: str = ""                # the model's version (every answer names it)
