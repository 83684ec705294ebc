"""The policy: a causal LM with a value head on its last hidden state, saved as a HF directory
(config, weights, tokenizer) plus value_head.safetensors."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

VALUE_HEAD = "value_head.safetensors"


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: the first real token of every row is position 0."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


class Policy(nn.Module):
    """logits and values for every position of a (left-padded prompt + response) batch."""

    def __init__(self, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.lm, self.tokenizer = lm, tokenizer
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.model(input_ids=ids, attention_mask=mask,
                               position_ids=positions(mask)).last_hidden_state
        return self.lm.lm_head(hidden), self.value_head(hidden).squeeze(-1)

    def frozen_copy(self) -> Policy:
        """A copy that never trains (the reference policy)."""
        ref = copy.deepcopy(self).eval()
        ref.requires_grad_(False)
        return ref

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                  out / VALUE_HEAD)

    @classmethod
    def load(cls, path: Path) -> Policy:
        """A saved policy; an SFT checkpoint without a value head gets a fresh (zero) one."""
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no policy checkpoint here (config.json missing)")
        policy = cls(AutoModelForCausalLM.from_pretrained(path),
                     AutoTokenizer.from_pretrained(path))
        if (path / VALUE_HEAD).exists():
            policy.value_head.load_state_dict(load_file(path / VALUE_HEAD))
        return policy


def new_lm(tokenizer: PreTrainedTokenizerBase, hidden_size: int, layers: int, heads: int,
           max_len: int) -> PreTrainedModel:
    """A fresh Llama-style causal LM for the tokenizer's vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads,
        intermediate_size=2 * hidden_size, max_position_embeddings=max_len,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)
