"""Score responses in process: per-response-token rewards from a token reward model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenrm.training.encoding import encode, fit
from tokenrm.training.reward_rule import token_rewards


@dataclass(frozen=True)
class Scored:
    """One response's rewards (one per kept response token) and their character offsets."""

    rewards: np.ndarray
    offsets: list[tuple[int, int]]
    token_ids: list[int]


@torch.inference_mode()
def score_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                items: Sequence[tuple[str, str]], max_len: int, batch_size: int = 64
                ) -> list[Scored]:
    """Rewards for (prompt, response) items, batched with right padding (the model is causal)."""
    model.eval()
    id2label = model.config.id2label
    out: list[Scored] = []
    for start in range(0, len(items), batch_size):
        chunk = [encode(tokenizer, p, r) for p, r in items[start:start + batch_size]]
        fitted = [fit(e.prompt_ids, e.response_ids, max_len) for e in chunk]
        width = max(len(p) + len(r) for p, r, _ in fitted)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, r, _) in enumerate(fitted):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            mask[i, :len(p) + len(r)] = 1
        rewards = token_rewards(model(input_ids=ids, attention_mask=mask).logits, id2label)
        for i, (e, (p, r, _)) in enumerate(zip(chunk, fitted, strict=True)):
            row = rewards[i, len(p):len(p) + len(r)].numpy().astype(np.float32)
            out.append(Scored(row, e.offsets[:len(r)], r))
    return out
