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


def padded_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded: with causal attention and the mask, a row's
    logits do not depend on what else is in the batch."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


@torch.inference_mode()
def row_rewards(model: PreTrainedModel, rows: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
    """(rows, longest) float32 rewards of one padded forward pass; padding columns are junk."""
    ids, mask = padded_batch(rows, pad_id)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return token_rewards(logits, model.config.id2label).cpu().numpy().astype(np.float32)


def score_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                items: Sequence[tuple[str, str]], max_len: int, batch_size: int = 64
                ) -> list[Scored]:
    """Rewards for (prompt, response) items, in batches of `batch_size`."""
    model.eval()
    out: list[Scored] = []
    for start in range(0, len(items), batch_size):
        chunk = [encode(tokenizer, p, r) for p, r in items[start:start + batch_size]]
        fitted = [fit(e.prompt_ids, e.response_ids, max_len) for e in chunk]
        rewards = row_rewards(model, [p + r for p, r, _ in fitted], tokenizer.pad_token_id)
        for i, (e, (p, r, _)) in enumerate(zip(chunk, fitted, strict=True)):
            out.append(Scored(rewards[i, len(p):len(p) + len(r)].copy(), e.offsets[:len(r)], r))
    return out
