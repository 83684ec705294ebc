"""Per-token rewards for the policy's responses, from a tokenrm server through the client.

When the policy's tokenizer is the reward model's (same fingerprint), the exact generated token
ids are sent; otherwise the decoded text, with each policy token's character span, and the
server maps its rewards back onto the policy's tokens. Either way every response gets one
reward per policy token; a final EOS (which the reward model never sees) gets 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from tokenrm.client import Item, ItemScore, RewardClient
from tokenrm.core.spans import decoded_with_offsets
from tokenrm.core.tokenizer import fingerprint

Send = Literal["auto", "ids", "text"]


class RewardSource:
    """Submits rollouts for scoring and returns futures of aligned reward arrays."""

    def __init__(self, client: RewardClient, tokenizer: PreTrainedTokenizerBase,
                 send: Send = "auto", timeout_s: float | None = None) -> None:
        self.client, self.tokenizer, self.timeout_s = client, tokenizer, timeout_s
        info = client.model_info(timeout_s)
        same = info.tokenizer_sha256 == fingerprint(tokenizer)
        if send == "ids" and not same:
            raise ValueError("send=ids: the server's tokenizer is not the policy's "
                             f"(sha256 {info.tokenizer_sha256[:12] or 'unknown'} vs "
                             f"{fingerprint(tokenizer)[:12]}); send text instead")
        self.sends_ids = send == "ids" or (send == "auto" and same)

    def submit(self, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]],
               responses: Sequence[Sequence[int]]) -> Future[list[np.ndarray]]:
        """Rewards of each response (one per token, EOS included), when the future is done."""
        eos = self.tokenizer.eos_token_id
        items, targets = [], []  # targets: (response, its tokens that the rewards go to)
        for i, r in enumerate(responses):
            ids = list(r[:-1]) if r and r[-1] == eos else list(r)
            item, positions = self._item(prompts[i], prompt_ids[i], ids)
            if positions:  # an empty response gets nothing
                items.append(item)
                targets.append((i, positions))
        result: Future[list[np.ndarray]] = Future()
        pending = self.client.submit(items, timeout_s=self.timeout_s)
        result.add_done_callback(lambda f: pending.cancel() if f.cancelled() else None)

        def done(f: Future[list[ItemScore]]) -> None:
            with contextlib.suppress(InvalidStateError):  # the caller cancelled `result`
                try:
                    aligned = self._aligned(responses, targets, f.result())
                except BaseException as exc:  # handed to the caller, who waits on `result`
                    result.set_exception(exc)
                    return
                result.set_result(aligned)

        pending.add_done_callback(done)
        return result

    def _aligned(self, responses: Sequence[Sequence[int]],
                 targets: list[tuple[int, list[int]]], scores: list[ItemScore]
                 ) -> list[np.ndarray]:
        out = [np.zeros(len(r), dtype=np.float32) for r in responses]
        for (i, positions), score in zip(targets, scores, strict=True):
            out[i][positions] = score.rewards if self.sends_ids else score.span_rewards
        return out

    def _item(self, prompt: str, prompt_ids: Sequence[int], response: list[int]
              ) -> tuple[Item, list[int]]:
        """The item to score, and the response tokens its rewards belong to (in text form,
        a token with an empty span is not sent and keeps 0)."""
        if self.sends_ids:
            return Item.tokens(prompt_ids, response), list(range(len(response)))
        text, offsets = decoded_with_offsets(self.tokenizer, response)
        kept = [t for t, (a, b) in enumerate(offsets) if a < b]
        return Item.text(prompt, text, spans=[offsets[t] for t in kept]), kept
