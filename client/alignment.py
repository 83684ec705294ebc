"""Rewards for a policy's own tokens: what to send for each rollout, and where the answers go.

When the policy's tokenizer is the reward model's (same fingerprint), a rollout is sent as its
exact token ids; otherwise as decoded text with each policy token's character span, and the
server sums its rewards into those spans. Either way every response gets one reward per policy
token; a final EOS (which the reward model never sees) and tokens of no characters get 0.
Pure functions around the client's calls; torch-free (`tokenizer`: any Hugging Face tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tokenrm.client.async_client import AsyncRewardClient
from tokenrm.client.types import Item, ItemScore, ModelInfo
from tokenrm.core.spans import decoded_with_offsets
from tokenrm.core.tokenizer import fingerprint

Send = Literal["auto", "ids", "text"]


def sends_ids(info: ModelInfo, tokenizer: Any, send: Send = "auto") -> bool:
    """Whether rollouts go as token ids: asked for (then the tokenizers must match), or `auto`
    and the fingerprints are equal."""
    same = info.tokenizer_sha256 == fingerprint(tokenizer)
    if send == "ids" and not same:
        raise ValueError("send=ids: the server's tokenizer is not the policy's "
                         f"(sha256 {info.tokenizer_sha256[:12] or 'unknown'} vs "
                         f"{fingerprint(tokenizer)[:12]}); send text instead")
    if send not in ("auto", "ids", "text"):
        raise ValueError(f"send={send!r}: choose auto, ids or text")
    return send == "ids" or (send == "auto" and same)


@dataclass(frozen=True)
class Plan:
    """The items to score and, for each, its rollout and the response positions its rewards
    go to (rollouts with nothing to score are not sent)."""

    items: list[Item]
    targets: list[tuple[int, list[int]]]
    lengths: list[int]                    # each rollout's response length, in policy tokens

    def place(self, scores: Sequence[ItemScore], by_ids: bool) -> list[np.ndarray]:
        """One float32 array per rollout, one reward per policy token of its response."""
        out = [np.zeros(n, dtype=np.float32) for n in self.lengths]
        for (i, positions), score in zip(self.targets, scores, strict=True):
            out[i][positions] = score.rewards if by_ids else score.span_rewards
        return out


def plan(tokenizer: Any, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]],
         responses: Sequence[Sequence[int]], by_ids: bool) -> Plan:
    """What to send for each rollout (prompt text, prompt ids, response ids)."""
    eos = tokenizer.eos_token_id
    items, targets = [], []
    for i, response in enumerate(responses):
        ids = [int(t) for t in response]
        if ids and ids[-1] == eos:
            ids.pop()
        if by_ids:
            item, positions = Item.tokens(prompt_ids[i], ids), list(range(len(ids)))
        else:
            text, offsets = decoded_with_offsets(tokenizer, ids)
            positions = [t for t, (a, b) in enumerate(offsets) if a < b]
            item = Item.text(prompts[i], text, spans=[offsets[t] for t in positions])
        if positions:
            items.append(item)
            targets.append((i, positions))
    return Plan(items, targets, [len(r) for r in responses])


async def aligned_rewards(client: AsyncRewardClient, tokenizer: Any, prompts: Sequence[str],
                          prompt_ids: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]], send: Send = "auto",
                          timeout_s: float | None = None) -> list[np.ndarray]:
    """One reward per policy token of each response, scored through `client` (see `plan`)."""
    by_ids = sends_ids(await client.model_info(timeout_s), tokenizer, send)
    todo = plan(tokenizer, prompts, prompt_ids, responses, by_ids)
    return todo.place(await client.score(todo.items, timeout_s=timeout_s), by_ids)
