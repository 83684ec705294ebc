"""`tokenrm train-rm`: fit a token reward model on minimal-edit pairs with the HF Trainer."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional
from transformers import (
    AutoTokenizer,
    DataCollatorForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from tokenrm.core.encoding import encode, fit
from tokenrm.core.scoring import score_texts
from tokenrm.training.data import Pair, load_pairs
from tokenrm.training.evaluate import evaluate
from tokenrm.training.labels import IGNORE, NEUTRAL, edit_labels
from tokenrm.training.model import build_model
from tokenrm.training.presets import Preset
from tokenrm.training.tokenizer import train_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trained:
    """What `train_rm` made: the checkpoint directory, and the best model, tokenizer, metrics."""

    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    metrics: dict[str, Any]


@dataclass(frozen=True)
class TrainOptions:
    seed: int = 0                 # model init, data order and dropout
    threads: int | None = None    # torch CPU threads; None: torch's default
    deterministic: bool = True    # torch's deterministic algorithms (where it has them)
    grad_accum: int = 1           # optimiser step every this many batches
    base: Path | None = None      # a local HF checkpoint to start from instead of a fresh backbone
    progress: bool = True         # show the Trainer's progress bar


def weighted_token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None,
                        weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy over labelled tokens, with edited (negative, positive) tokens weighted.

    Edited tokens are a few percent of all; weighting them speeds up learning to look facts
    up in the prompt, which plain cross-entropy reaches late or, for some seeds, not at all.
    """
    logits = outputs.logits.float()
    weights = torch.full((logits.shape[-1],), weight, device=logits.device)
    weights[NEUTRAL] = 1.0
    return functional.cross_entropy(logits.view(-1, logits.shape[-1]),
                                    labels.view(-1).to(logits.device),
                                    weight=weights, ignore_index=IGNORE)


def make_examples(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], max_len: int
                  ) -> tuple[list[dict[str, list[int]]], int]:
    """Two labelled sequences per pair (rejected, edited); also how many responses were cut."""
    examples, cut = [], 0
    for pair in pairs:
        rejected = encode(tokenizer, pair.prompt, pair.rejected)
        edited = encode(tokenizer, pair.prompt, pair.edited)
        labels = edit_labels(rejected.response_ids, edited.response_ids)
        for enc, lab in zip((rejected, edited), labels, strict=True):
            prompt_ids, response_ids, was_cut = fit(enc.prompt_ids, enc.response_ids, max_len)
            cut += was_cut
            examples.append({"input_ids": prompt_ids + response_ids,
                             "labels": [IGNORE] * len(prompt_ids) + lab[:len(response_ids)]})
    if cut:
        log.warning("%d responses are longer than max_len=%d tokens and were truncated",
                    cut, max_len)
    return examples, cut


def tokenizer_for(pairs: Sequence[Pair], preset: Preset, base: Path | None
               ) -> PreTrainedTokenizerBase:
    if base is not None:
        return AutoTokenizer.from_pretrained(base)
    texts = (t for p in pairs for t in (p.prompt, p.rejected, p.edited))
    return train_tokenizer(texts, vocab_size=preset.vocab_size)


def _args(out: Path, preset: Preset, options: TrainOptions) -> TrainingArguments:
    """Evaluate each epoch and keep the best one by held-out loss."""
    return TrainingArguments(
        output_dir=str(out), seed=options.seed, num_train_epochs=preset.epochs,
        learning_rate=preset.lr, per_device_train_batch_size=preset.batch_size,
        per_device_eval_batch_size=64, gradient_accumulation_steps=options.grad_accum,
        lr_scheduler_type="cosine", warmup_steps=preset.warmup_ratio,
        weight_decay=preset.weight_decay, eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=1, save_only_model=True, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", train_sampling_strategy="group_by_length",
        logging_steps=10, report_to="none", disable_tqdm=not options.progress,
        dataloader_pin_memory=False)


@contextlib.contextmanager
def reproducible(seed: int, threads: int | None, deterministic: bool = True) -> Iterator[None]:
    """Seeded, with `threads` torch threads (None: as they are) and torch's deterministic
    algorithms; restored after. The thread count changes how float sums are split, so a fixed
    one gives the same model on machines of the same kind."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    set_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


TrainFunction = Callable[[Path, Path, Preset, TrainOptions], Trained]


def seeded(train: TrainFunction) -> TrainFunction:
    """`train(data, out, preset, options)` run under `reproducible` with the options' seed,
    threads and determinism."""
    @functools.wraps(train)
    def run(data: Path, out: Path, preset: Preset, options: TrainOptions) -> Trained:
        with reproducible(options.seed, options.threads, options.deterministic):
            return train(data, out, preset, options)
    return run


@seeded
def train_rm(data: Path, out: Path, preset: Preset, options: TrainOptions) -> Trained:
    """Train on data/train.jsonl, keep the best epoch by loss on data/eval.jsonl, write `out`.

    The checkpoint directory gets the model, its tokenizer and metrics.json.
    """
    started = time.perf_counter()
    train_pairs, eval_pairs = load_pairs(data / "train.jsonl"), load_pairs(data / "eval.jsonl")
    tokenizer = tokenizer_for(train_pairs, preset, options.base)
    scratch = out / ".trainer"
    model = build_model(preset, tokenizer, options.base)
    max_len = model.config.tokenrm["max_len"]
    train_set, train_cut = make_examples(tokenizer, train_pairs, max_len)
    eval_set, eval_cut = make_examples(tokenizer, eval_pairs, max_len)

    args = _args(scratch, preset, options)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=DataCollatorForTokenClassification(tokenizer),
                      compute_loss_func=partial(weighted_token_loss,
                                                weight=preset.edit_label_weight))
    eval_loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    model = trainer.model
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "preset": preset.to_dict(),
        "seed": options.seed,
        "train": {
            "pairs": len(train_pairs), "steps": trainer.state.global_step,
            "loss_first": train_losses[0] if train_losses else None,
            "loss_last": train_losses[-1] if train_losses else None,
            "eval_loss_before": eval_loss_before,
            "eval_loss_by_epoch": [h["eval_loss"] for h in history
                                   if "eval_loss" in h and h.get("epoch", 0) > 0],
            "best_checkpoint": Path(trainer.state.best_model_checkpoint or "").name or None,
            "seconds": round(time.perf_counter() - started, 1),
        },
        "truncated_responses": {"train": train_cut, "eval": eval_cut},
        "eval": evaluate(lambda items: score_texts(model, tokenizer, items, max_len), eval_pairs),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return Trained(out, model, tokenizer, result)
