"""Turn (prompt, response) text into model input the way the server does, with truncation."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """Model input `prompt_ids + response_ids`; offsets are character spans into the response."""

    prompt_ids: list[int]
    response_ids: list[int]
    offsets: list[tuple[int, int]]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> Encoded:
    """The prompt gets what the tokenizer normally adds (BOS), unless its text starts with the
    BOS already (as chat templates' text often does); the response gets nothing added.
    Special-token text in either (`</s>`, `<|im_end|>`) is read as those special tokens."""
    bos = tokenizer.bos_token
    has_bos = isinstance(bos, str) and bool(bos) and prompt.startswith(bos)
    prompt_ids = tokenizer(prompt, add_special_tokens=not has_bos)["input_ids"]
    resp = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    return Encoded(list(prompt_ids), list(resp["input_ids"]),
                   [tuple(o) for o in resp["offset_mapping"]])


def fit(prompt_ids: list[int], response_ids: list[int], max_len: int
        ) -> tuple[list[int], list[int], bool]:
    """Fit into `max_len` tokens: drop prompt tokens from the left, then cut the response.

    Returns (prompt_ids, response_ids, whether the response was cut).
    """
    if len(response_ids) >= max_len:
        return [], response_ids[:max_len], len(response_ids) > max_len
    keep = max_len - len(response_ids)
    return prompt_ids[-keep:] if len(prompt_ids) > keep else prompt_ids, response_ids, False
