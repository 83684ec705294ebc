"""What a caller gives the client and gets back: items in, per-item scores out."""

from __future__ import annotations

from collections.abc import Sequence
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
