"""`tokenrm train-rm --objective pairwise`: a sequence-level Bradley-Terry reward model, trained
on the same minimal-edit pairs as the token reward model: one score per response, loss
-log sigmoid(r(edited) - r(rejected)). Standard RLHF's reward model: the baseline the
fine-grained method is compared with. The server serves it like any sequence-classification
checkpoint (its one score on the response's last token)."""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
)

from tokenrm.core.encoding import encode, fit
from tokenrm.core.scoring import padded_batch
from tokenrm.training.data import Pair, load_pairs
from tokenrm.training.model import build_model
from tokenrm.training.presets import Preset
from tokenrm.training.train import Trained, TrainOptions, seeded, tokenizer_for

log = logging.getLogger(__name__)
EVAL_BATCH = 64  # pairs per forward pass when evaluating


def pair_rows(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], max_len: int
              ) -> list[tuple[list[int], list[int]]]:
    """(rejected ids, edited ids) per pair, prompt + response fitted as the server fits them."""
    rows = []
    for pair in pairs:
        both = []
        for response in (pair.rejected, pair.edited):
            enc = encode(tokenizer, pair.prompt, response)
            prompt_ids, response_ids, _ = fit(enc.prompt_ids, enc.response_ids, max_len)
            both.append(prompt_ids + response_ids)
        rows.append((both[0], both[1]))
    return rows


def margins(model: PreTrainedModel, rows: Sequence[tuple[list[int], list[int]]], pad_id: int
            ) -> torch.Tensor:
    """r(edited) - r(rejected) for each pair, in one forward pass."""
    ids, mask = padded_batch([r for pair in rows for r in pair], pad_id)
    scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()  # (2P,)
    return scores[1::2] - scores[0::2]


def pairwise_loss(margin: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r(edited) - r(rejected)), averaged over pairs."""
    return -functional.logsigmoid(margin).mean()


@torch.no_grad()
def evaluate_pairs(model: PreTrainedModel, rows: Sequence[tuple[list[int], list[int]]],
                   pad_id: int) -> dict[str, float]:
    """Held-out loss, and the share of pairs whose edited response scores higher."""
    model.eval()
    got = torch.cat([margins(model, rows[i:i + EVAL_BATCH], pad_id)
                     for i in range(0, len(rows), EVAL_BATCH)])
    return {"loss": float(pairwise_loss(got)), "pairwise_accuracy": float((got > 0).float().mean())}


@seeded
def train_pairwise_rm(data: Path, out: Path, preset: Preset, options: TrainOptions) -> Trained:
    """Train on data/train.jsonl with the preset's budget (its epochs, sequences per step and
    learning rate schedule), keep the best epoch by loss on data/eval.jsonl, write `out`."""
    started = time.perf_counter()
    train_pairs, eval_pairs = load_pairs(data / "train.jsonl"), load_pairs(data / "eval.jsonl")
    tokenizer = tokenizer_for(train_pairs, preset, options.base)
    model = build_model(preset, tokenizer, options.base, head="sequence")
    pad_id = tokenizer.pad_token_id
    max_len = model.config.tokenrm["max_len"]
    train_rows = pair_rows(tokenizer, train_pairs, max_len)
    eval_rows = pair_rows(tokenizer, eval_pairs, max_len)
    per_step = max(1, preset.batch_size // 2)  # pairs: as many sequences as the token RM's step
    steps_per_epoch = -(-len(train_rows) // per_step)
    total = max(1, int(steps_per_epoch * preset.epochs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr,
                                  weight_decay=preset.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(total * preset.warmup_ratio), total)
    rng = random.Random(options.seed)
    before = evaluate_pairs(model, eval_rows, pad_id)
    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    order: list[int] = []
    for step in range(total):
        if not order:
            order = rng.sample(range(len(train_rows)), len(train_rows))
        batch = [train_rows[i] for i in order[:per_step]]
        del order[:per_step]
        model.train()
        loss = pairwise_loss(margins(model, batch, pad_id))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % steps_per_epoch == 0 or step + 1 == total:
            held = evaluate_pairs(model, eval_rows, pad_id)
            history.append({"step": step + 1, "train_loss": loss.item(), **held})
            log.info("pairwise RM step %d/%d: %s", step + 1, total, history[-1])
            if best is None or held["loss"] < best[0]:
                best = (held["loss"], copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[1])
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result = {"objective": "pairwise", "preset": preset.to_dict(), "seed": options.seed,
              "train": {"pairs": len(train_rows), "steps": total, "pairs_per_step": per_step,
                        "eval_before": before, "by_epoch": history,
                        "seconds": round(time.perf_counter() - started, 1)},
              "eval": {"pairs": len(eval_rows), **evaluate_pairs(model, eval_rows, pad_id)}}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return Trained(out, model, tokenizer, result)
