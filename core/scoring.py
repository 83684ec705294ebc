"""Score responses in process: per-response-token rewards from a token reward model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenrm.core.encoding import encode, fit
from tokenrm.core.reward_rule import token_rewards


@dataclass(frozen=True)
class Scored:
    """One response's rewards (one per kept response token) and their character offsets."""

    rewards: np.ndarray
    offsets: list[tuple[int, int]]
    token_ids: list[int]


Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, mask) -> logits


def padded_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded: with causal attention and the mask, a row's
    logits do not depend on what else is in the batch."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    ids = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    mask = np.arange(ids.shape[1]) < lengths[:, None]
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def eager_logits(model: PreTrainedModel) -> Logits:
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


@torch.inference_mode()
def row_rewards(model: PreTrainedModel, rows: Sequence[Sequence[int]], pad_id: int,
                logits: Logits | None = None) -> np.ndarray:
    """(rows, longest) float32 rewards of one padded forward pass; padding columns are junk.
    `logits`: how to run the model (default: eagerly, as it is)."""
    ids, mask = padded_batch(rows, pad_id)
    device = next(model.parameters()).device
    out = (logits or eager_logits(model))(ids.to(device), mask.to(device))
    return token_rewards(out, model.config.id2label).cpu().numpy().astype(np.float32)


def on_last_token(reward: float, n: int) -> np.ndarray:
    """A sequence reward as `n` token rewards: all on the last token, zeros before it."""
    out = np.zeros(n, dtype=np.float32)
    if n:
        out[-1] = reward
    return out


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
