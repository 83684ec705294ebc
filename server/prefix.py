"""Prompt-prefix reuse: rows that share their prompt tokens compute the prompt once.

Trainers score several samples per prompt. In a causal model a prompt token's keys and values
do not depend on what follows it, so a batch runs as: the distinct prompts, in passes of like
lengths, keeping their KV cache; then each prompt's rows' response tokens against that cache
(without its padding), in passes of like response lengths, with positions continuing after the
prompt. The response tokens' logits are those of the full forward (checked at load on probe
batches, see `verify`); an encoder's are not, and it is served as before.
"""

from __future__ import annotations

import copy
import inspect
import logging
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from tokenrm.core.reward_rule import token_rewards
from tokenrm.core.scoring import on_last_token, padded_batch, row_rewards
from tokenrm.server.batching import ReusePlan, Rows, plan_reuse

log = logging.getLogger(__name__)
TOLERANCE = 1e-5                                     # at float32: the full forward's rewards
PROBE = ((9, (4, 11, 1)), (3, (6,)), (17, (2, 8)))  # (prompt length, its responses' lengths)


@torch.inference_mode()
def prefix_rewards(model: PreTrainedModel, rows: Rows, pad_id: int,
                   plan: ReusePlan) -> list[np.ndarray]:
    """Rewards of the last `n` tokens of each row, run as `plan` says (batching.plan_reuse)."""
    prompts: list[Sequence[int]] = [()] * len(plan.groups)
    for (ids, n), g in zip(rows, plan.groups, strict=True):
        prompts[g] = ids[:len(ids) - n]
    device = next(model.parameters()).device
    name = _cache_argument(model)
    computed: dict[int, tuple[Any, int]] = {}       # prompt -> (its pass's cache, its row)
    for chosen in plan.prompt_passes:
        ids, mask = (t.to(device) for t in padded_batch([prompts[g] for g in chosen], pad_id))
        cache = model.base_model(input_ids=ids, attention_mask=mask, use_cache=True)[name]
        computed.update((g, (cache, j)) for j, g in enumerate(chosen))
    out: list[np.ndarray] = [np.empty(0, np.float32)] * len(rows)
    for chosen in plan.response_passes:
        g = plan.groups[chosen[0]]
        cache = _rows_of(*computed[g], len(prompts[g]), len(chosen))
        ids, mask = (t.to(device) for t in padded_batch(
            [rows[i][0][len(prompts[g]):] for i in chosen], pad_id))
        positions = len(prompts[g]) + torch.arange(ids.shape[1], device=device)
        logits = model(input_ids=ids, attention_mask=torch.cat(
            [torch.ones(len(chosen), len(prompts[g]), dtype=mask.dtype, device=device), mask],
            dim=1), position_ids=positions.expand(len(chosen), -1), use_cache=False,
            **{name: cache}).logits
        rewards = token_rewards(logits, model.config.id2label).float().cpu().numpy()
        for k, i in enumerate(chosen):
            n = rows[i][1]
            out[i] = (on_last_token(float(rewards[k]), n) if rewards.ndim == 1
                      else rewards[k, :n].copy())
    return out


def _rows_of(cache: Any, row: int, length: int, copies: int) -> Any:
    """A cache holding `copies` times row `row` of `cache`, its first `length` positions (the
    prompt without its padding): views, which the forward's own concatenation copies once."""
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in view.layers:
        layer.keys = layer.keys[row:row + 1, :, :length].expand(copies, -1, -1, -1)
        layer.values = layer.values[row:row + 1, :, :length].expand(copies, -1, -1, -1)
    return view


def _cache_argument(model: PreTrainedModel) -> str:
    """What the model's forward calls its KV cache: `cache` from transformers 5.2x on (the old
    name still works there, with a deprecation warning), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


def verify(model: PreTrainedModel, pad_id: int, vocab_size: int, tolerance: float) -> bool:
    """Does the prompt-once forward give the full forward's rewards on probe batches (prompts
    of unlike lengths, several responses each, in several passes)? False, with one log line,
    if not or if it fails."""
    rng = random.Random(0)
    rows = []
    for prompt_len, lengths in PROBE:
        prompt = [rng.randrange(vocab_size) for _ in range(prompt_len)]
        rows += [(prompt + [rng.randrange(vocab_size) for _ in range(n)], n) for n in lengths]
    try:
        plan = plan_reuse(rows, overhead_tokens=0)
        if plan is None:
            raise RuntimeError("the probe rows do not share prompts")
        got = prefix_rewards(model, rows, pad_id, plan)
        full = row_rewards(model, [ids for ids, _ in rows], pad_id)
    except Exception as exc:  # a model without a KV cache or positions: the full forward only
        log.info("prompt-prefix reuse off: the model cannot run on a cache (%s: %s)",
                 type(exc).__name__, exc)
        return False
    for i, (ids, n) in enumerate(rows):
        want = full[i, len(ids) - n:len(ids)] if full.ndim == 2 else full[i]
        have = got[i] if full.ndim == 2 else got[i][-1]
        if np.abs(np.asarray(have) - want).max() > tolerance:
            log.info("prompt-prefix reuse off: the prompt-once forward differs from the full one "
                     "by more than %g (not a causal decoder?)", tolerance)
            return False
    return True
