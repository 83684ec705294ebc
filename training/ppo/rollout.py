"""Rollouts: sampling responses from the policy, and the tensors the update works on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional

from tokenrm.training.ppo.policy import Policy


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 80

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature: {self.temperature}; must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: {self.top_p}; must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens}; must be at least 1")


def left_padded(rows: Sequence[Sequence[int]], pad_id: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids, mask


@torch.inference_mode()
def sample(policy: Policy, prompts: Sequence[Sequence[int]], sampling: Sampling
           ) -> list[list[int]]:
    """One sampled response per prompt: its token ids, up to and including EOS if one came."""
    tok = policy.tokenizer
    ids, mask = left_padded(prompts, tok.pad_token_id)
    out = policy.lm.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=0, max_new_tokens=sampling.max_new_tokens,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    responses = []
    for row in out[:, ids.shape[1]:].tolist():
        end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        responses.append(row[:end])
    return responses


@dataclass(frozen=True)
class Batch:
    """Prompts left-padded to P columns, then responses right-padded to R columns."""

    ids: torch.Tensor            # (B, P + R)
    mask: torch.Tensor           # (B, P + R) attention mask
    response_mask: torch.Tensor  # (B, R) float: 1 at real response tokens
    prompt_width: int

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
           pad_id: int) -> Batch:
        p_ids, p_mask = left_padded(prompts, pad_id)
        width = max(1, max(len(r) for r in responses))
        r_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
        r_mask = torch.zeros((len(responses), width))
        for i, row in enumerate(responses):
            r_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            r_mask[i, :len(row)] = 1.0
        return cls(torch.cat([p_ids, r_ids], dim=1),
                   torch.cat([p_mask, r_mask.long()], dim=1), r_mask, p_ids.shape[1])

    def select(self, rows: torch.Tensor) -> Batch:
        return Batch(self.ids[rows], self.mask[rows], self.response_mask[rows],
                     self.prompt_width)


def response_outputs(policy: Policy, batch: Batch, temperature: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probabilities of the response tokens, values, logits), each over the R response
    positions: position t is predicted from the state before token t."""
    logits, values = policy(batch.ids, batch.mask)
    p = batch.prompt_width
    logits = logits[:, p - 1:-1] / temperature
    targets = batch.ids[:, p:]
    logprobs = -functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return logprobs, values[:, p - 1:-1], logits
