"""A reward function for TRL's GRPOTrainer and RLOOTrainer: one value per completion, from the
per-token rewards of a tokenrm server (TRL takes no per-token rewards).

    from tokenrm.integrations.trl import TokenRMReward

    reward = TokenRMReward("grpc://127.0.0.1:50051", tokenizer=tokenizer, reduction="total")
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], ...)

It is async (TRL runs it on its own event loop, beside other reward functions) and named
`tokenrm` in TRL's logs (`rewards/tokenrm/mean`). With the policy's tokenizer given and equal to
the server's (same fingerprint), the completions' exact ids are scored; otherwise their text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenrm.client import AsyncRewardClient, Item
from tokenrm.client.alignment import aligned_rewards
from tokenrm.core.reductions import reduce_rewards
from tokenrm.integrations.options import Options


class TokenRMReward:
    """`await reward(prompts=..., completions=..., completion_ids=..., **columns)` -> floats."""

    def __init__(self, url: str | Sequence[str] | None = None, *, tokenizer: Any = None,
                 reduction: str | None = None, api_key: str | None = None,
                 timeout_s: float | None = None, send: str | None = None,
                 name: str = "tokenrm") -> None:
        self.options = Options.from_env(urls=url, reduction=reduction, api_key=api_key,
                                        timeout_s=timeout_s, send=send)
        self.tokenizer = tokenizer
        self.__name__ = name
        self._client: AsyncRewardClient | None = None

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                       completion_ids: Sequence[Sequence[int]] | None = None,
                       **columns: Any) -> list[float | None]:
        texts = [_text(p, self.tokenizer, prompt=True) for p in prompts]
        client, o = self._connected(), self.options
        if self.tokenizer is not None and completion_ids is not None:
            prompt_ids = [_prompt_ids(p, self.tokenizer) for p in prompts]
            token_rewards = await aligned_rewards(client, self.tokenizer, texts, prompt_ids,
                                                  completion_ids, o.send, o.timeout_s)
        else:
            items = [Item.text(p, _text(c, self.tokenizer, prompt=False))
                     for p, c in zip(texts, completions, strict=True)]
            token_rewards = [s.rewards for s in await client.score(items, timeout_s=o.timeout_s)]
        return [reduce_rewards(r, self.options.reduction) for r in token_rewards]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _connected(self) -> AsyncRewardClient:
        """The client, made on first use on the loop that calls (TRL's own loop)."""
        if self._client is None:
            o = self.options
            self._client = AsyncRewardClient(list(o.urls), api_key=o.api_key, timeout_s=o.timeout_s)
        return self._client


def _text(value: Any, tokenizer: Any, *, prompt: bool) -> str:
    """A prompt or completion as text: plain strings as they are; chat messages through the
    tokenizer's chat template when there is one (prompts with the generation prompt), else
    their contents joined."""
    if isinstance(value, str):
        return value
    messages = list(value)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        if prompt:
            return str(tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=True))
        return "".join(str(m["content"]) for m in messages)
    return "\n".join(str(m["content"]) for m in messages)


def _prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:
    """The prompt's ids as TRL makes them: a string as the tokenizer encodes it (BOS added),
    chat messages through the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    ids = tokenizer.apply_chat_template(list(prompt), tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
