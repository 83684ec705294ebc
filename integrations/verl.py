"""A verl reward manager that takes per-token rewards from a tokenrm server: the dense
(batch, response_len) tensor that verl's trainer consumes as `token_level_scores` (it subtracts
its KL term itself), aligned to the policy's response tokens, zeros on padding.

verl (0.9) loads it with
    reward.reward_manager.source=importlib
    reward.reward_manager.name=TokenRMRewardManager
    reward.reward_manager.module.path=pkg://tokenrm.integrations.verl
and the server's address from TOKENRM_URL (see options.py) in the workers' environment.

Current interface: `run_single` (one row, async) returns the row's rewards and
`assemble_rm_scores` lays them out densely; verl's reward-loop manager calls the two. verl's
agent loop keeps one float per trajectory: there, set TOKENRM_DENSE=0 (the total on the last
token). Legacy interface: calling the manager on a whole DataProto returns the dense tensor
(and `reward_extra_info` with `return_dict=True`). A failed scoring call raises an error naming
the rows; nothing is ever filled with silent zeros.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from tokenrm.client import AsyncRewardClient, RewardClientError
from tokenrm.client.alignment import aligned_rewards
from tokenrm.core.reductions import token_summary
from tokenrm.integrations.options import Options


class TokenRMRewardManager(RewardManagerBase):
    def __init__(self, config: Any = None, tokenizer: Any = None, compute_score: Any = None,
                 reward_router_address: str | None = None,
                 reward_model_tokenizer: Any = None, **given: Any) -> None:
        super().__init__(config, tokenizer, compute_score)
        self.options = Options.from_env(**given)
        self._clients: dict[int, AsyncRewardClient] = {}  # one per event loop that calls

    async def run_single(self, data: DataProto) -> dict[str, Any]:
        """One row: its token rewards (or, with dense off, their total) and extra info."""
        rewards = (await self._score(data))[-1]
        score: Any = rewards.tolist() if self.options.dense else float(rewards.sum())
        return {"reward_score": score, "reward_extra_info": _extra(rewards)}

    @classmethod
    def assemble_rm_scores(cls, data: DataProto, scores: list[Any]) -> torch.Tensor:
        """(batch, response_len): each row's token rewards from its first response token, or a
        scalar on its last token."""
        mask = _response_mask(data)                                          # (B, R)
        out = torch.zeros(mask.shape, dtype=torch.float32)
        for i, score in enumerate(scores):
            n = int(mask[i].sum())
            if isinstance(score, (list, tuple, np.ndarray)):
                out[i, :len(score)] = torch.as_tensor(np.asarray(score, np.float32))
            elif n:
                out[i, n - 1] = float(score)
        return out

    def __call__(self, data: DataProto, return_dict: bool = False) -> Any:
        """The legacy interface: the whole batch at once."""
        rewards = asyncio.run(self._score(data, own_loop=True))
        scores = [r.tolist() if self.options.dense else float(r.sum()) for r in rewards]
        tensor = self.assemble_rm_scores(data, scores)
        if not return_dict:
            return tensor
        extra = [_extra(r) for r in rewards]
        return {"reward_tensor": tensor,
                "reward_extra_info": {k: [e[k] for e in extra] for k in extra[0]} if extra else {}}

    async def _score(self, data: DataProto, own_loop: bool = False) -> list[np.ndarray]:
        prompts, responses = rows(data)
        texts = [self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
        client = self._client(own_loop)
        try:
            return await aligned_rewards(client, self.tokenizer, texts, prompts, responses,
                                         self.options.send, self.options.timeout_s)
        except RewardClientError as exc:
            raise RuntimeError(f"tokenrm could not score rows 0-{len(responses) - 1} of this "
                               f"batch at {', '.join(self.options.urls)}: "
                               f"{type(exc).__name__}: {exc}") from exc
        finally:
            if own_loop:
                await client.close()

    def _client(self, own_loop: bool) -> AsyncRewardClient:
        o = self.options
        if own_loop:  # a loop of its own, closed with the call
            return AsyncRewardClient(list(o.urls), api_key=o.api_key, timeout_s=o.timeout_s)
        key = id(asyncio.get_running_loop())
        if key not in self._clients:
            self._clients[key] = AsyncRewardClient(list(o.urls), api_key=o.api_key,
                                                   timeout_s=o.timeout_s)
        return self._clients[key]


def rows(data: DataProto) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's prompt ids (padding dropped, on either side) and response ids (right-padded:
    the first `valid` of them)."""
    prompts, responses = data.batch["prompts"], data.batch["responses"]           # (B, P), (B, R)
    prompt_mask = data.batch["attention_mask"][:, :prompts.shape[1]].bool()      # (B, P)
    response_mask = _response_mask(data).bool()                                  # (B, R)
    return ([p[m].tolist() for p, m in zip(prompts, prompt_mask, strict=True)],
            [r[m].tolist() for r, m in zip(responses, response_mask, strict=True)])


def _response_mask(data: DataProto) -> torch.Tensor:
    prompt_length = data.batch["prompts"].shape[1]
    return data.batch["attention_mask"][:, prompt_length:]                       # (B, R)


def _extra(rewards: np.ndarray) -> dict[str, float]:
    return {"tokenrm_total": float(rewards.sum(dtype=np.float64)), **token_summary(rewards)}
