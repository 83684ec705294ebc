"""Per-token rewards for the policy's responses, from a tokenrm server through the client
(what is sent and where the answers go: tokenrm.client.alignment)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError

import numpy as np
from transformers import PreTrainedTokenizerBase

from tokenrm.client import ItemScore, RewardClient
from tokenrm.client.alignment import Plan, Send, plan, sends_ids


class RewardSource:
    """Submits rollouts for scoring and returns futures of aligned reward arrays."""

    def __init__(self, client: RewardClient, tokenizer: PreTrainedTokenizerBase,
                 send: Send = "auto", timeout_s: float | None = None) -> None:
        self.client, self.tokenizer, self.timeout_s = client, tokenizer, timeout_s
        self.sends_ids = sends_ids(client.model_info(timeout_s), tokenizer, send)

    def submit(self, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]],
               responses: Sequence[Sequence[int]]) -> Future[list[np.ndarray]]:
        """Rewards of each response (one per token, EOS included), when the future is done."""
        todo: Plan = plan(self.tokenizer, prompts, prompt_ids, responses, self.sends_ids)
        result: Future[list[np.ndarray]] = Future()
        pending = self.client.submit(todo.items, timeout_s=self.timeout_s)
        result.add_done_callback(lambda f: pending.cancel() if f.cancelled() else None)

        def done(f: Future[list[ItemScore]]) -> None:
            with contextlib.suppress(InvalidStateError):  # the caller cancelled `result`
                try:
                    aligned = todo.place(f.result(), self.sends_ids)
                except BaseException as exc:  # handed to the caller, who waits on `result`
                    result.set_exception(exc)
                    return
                result.set_result(aligned)

        pending.add_done_callback(done)
        return result
