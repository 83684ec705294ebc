"""The token reward model: a token-classification head with labels negative, neutral, positive."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoConfig,
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
                base: str | Path | None = None) -> PreTrainedModel:
    """A fresh backbone sized by `preset`, or a local HF checkpoint as the base, with a 3-label
    token-classification head."""
    if base is not None:
        config = AutoConfig.from_pretrained(base, **LABELS)
        model = AutoModelForTokenClassification.from_pretrained(base, config=config)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        config = backbone_config(preset, tokenizer)
        config.update(LABELS)
        model = AutoModelForTokenClassification.from_config(config)
    # Our metadata lives under one key of config.json.
    model.config.tokenrm = {"reward": POS_MINUS_NEG,
                            "max_len": min(preset.max_len, config.max_position_embeddings)}
    return model
