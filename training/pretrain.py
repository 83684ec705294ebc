"""Pretrain the backbone as a small causal LM on the task's edited (good) responses.

A reward model normally starts from a pretrained LM. Ours is tiny and has no hub to come from,
so it learns from the task's own text first: predicting a response word by word teaches it to
look facts up in the prompt, which the token labels alone teach slowly (they are sparse).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import (
    DataCollatorForTokenClassification,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from tokenrm.training.data import Pair
from tokenrm.training.encoding import encode, fit
from tokenrm.training.labels import IGNORE
from tokenrm.training.model import backbone_config
from tokenrm.training.presets import Preset


def lm_examples(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], max_len: int
                ) -> list[dict[str, list[int]]]:
    """Prompt + edited response; the loss is on the response tokens only."""
    examples = []
    for pair in pairs:
        enc = encode(tokenizer, pair.prompt, pair.edited)
        prompt_ids, response_ids, _ = fit(enc.prompt_ids, enc.response_ids, max_len)
        examples.append({"input_ids": prompt_ids + response_ids,
                         "labels": [IGNORE] * len(prompt_ids) + response_ids})
    return examples


def pretrain_lm(pairs: Sequence[Pair], tokenizer: PreTrainedTokenizerBase, preset: Preset,
                args: TrainingArguments, out: Path) -> Path:
    """Train a causal LM sized by `preset` with `args`, save it (and the tokenizer) to `out`."""
    model = LlamaForCausalLM(backbone_config(preset, tokenizer))
    trainer = Trainer(model=model, args=args,
                      train_dataset=lm_examples(tokenizer, pairs, preset.max_len),
                      data_collator=DataCollatorForTokenClassification(tokenizer))
    trainer.train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
