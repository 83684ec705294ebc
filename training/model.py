"""The reward models' networks: a Llama-style backbone with a token-classification head (labels
negative, neutral, positive) or a one-score sequence head (the Bradley-Terry RM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tokenrm.core.reward_rule import POS_MINUS_NEG
from tokenrm.training.labels import LABEL_NAMES
from tokenrm.training.presets import Preset

ID2LABEL = dict(enumerate(LABEL_NAMES))
LABELS = {"num_labels": len(LABEL_NAMES), "id2label": ID2LABEL,
          "label2id": {v: k for k, v in ID2LABEL.items()}}
SCORE_LABEL = {"num_labels": 1, "id2label": {0: "score"}, "label2id": {"score": 0}}
Head = Literal["token", "sequence"]
HEADS: dict[str, tuple[Any, dict[str, Any]]] = {
    "token": (AutoModelForTokenClassification, LABELS),
    "sequence": (AutoModelForSequenceClassification, SCORE_LABEL)}


def backbone_config(preset: Preset, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """A Llama-style configuration sized by `preset`, for the tokenizer's vocabulary."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.hidden_size,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads, intermediate_size=preset.intermediate_size,
        max_position_embeddings=preset.max_len, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False)


def build_model(preset: Preset, tokenizer: PreTrainedTokenizerBase,
                base: str | Path | None = None, head: Head = "token") -> PreTrainedModel:
    """A fresh backbone sized by `preset`, or a local HF checkpoint as the base, with a head:
    "token", 3 labels per token; "sequence", one score per sequence (HF pools it at the last
    token that is not padding)."""
    auto, labels = HEADS[head]
    if base is not None:
        config = AutoConfig.from_pretrained(base, **labels)
        if head == "sequence":
            config.pad_token_id = tokenizer.pad_token_id
        model = auto.from_pretrained(base, config=config)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        config = backbone_config(preset, tokenizer)
        config.update(labels)
        model = auto.from_config(config)
    # Our metadata lives under one key of config.json.
    max_len = min(preset.max_len, config.max_position_embeddings)
    model.config.tokenrm = ({"reward": POS_MINUS_NEG, "max_len": max_len} if head == "token"
                            else {"max_len": max_len})
    return model
