"""Supervised fine-tuning of the policy on the synthetic task's responses, erroneous and
correct ones alike: a starting point that makes errors, so that PPO has room to improve."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tokenrm.core.encoding import encode
from tokenrm.core.scoring import padded_batch
from tokenrm.training import synth
from tokenrm.training.ppo.policy import Policy, new_lm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTRecipe:
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    max_len: int = 256        # prompt + response tokens
    pairs: int = 8000         # synthetic pairs; both responses of each are trained on
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 3e-3          # peak; linear warm-up over 5% of steps, cosine decay after
    seed: int = 0
    data_seed: int = 11       # a world of people the reward model's data did not use

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


SFT_RECIPES = {
    "tiny": SFTRecipe(hidden_size=32, layers=1, heads=2, pairs=200, epochs=1.0),
    "demo": SFTRecipe(),
}


def sft_examples(tokenizer: PreTrainedTokenizerBase, recipe: SFTRecipe
                 ) -> list[tuple[list[int], int]]:
    """(prompt + response + EOS ids, prompt length) for both responses of every pair."""
    out = []
    for pair in synth.generate(recipe.data_seed, recipe.pairs):
        for response in (pair.rejected, pair.edited):
            enc = encode(tokenizer, pair.prompt, response)
            ids = [*enc.input_ids, tokenizer.eos_token_id]
            if len(ids) <= recipe.max_len:
                out.append((ids, len(enc.prompt_ids)))
    return out


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_sft(tokenizer_dir: Path, recipe: SFTRecipe, out: Path) -> Policy:
    """Train a fresh policy with the tokenizer saved in `tokenizer_dir` (e.g. the reward
    model's checkpoint, so that the two share token ids), and save it to `out`."""
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    policy = Policy(new_lm(tokenizer, recipe.hidden_size, recipe.layers, recipe.heads,
                           recipe.max_len), tokenizer)
    examples = sft_examples(tokenizer, recipe)
    steps = max(1, int(len(examples) * recipe.epochs) // recipe.batch_size)
    optimizer = torch.optim.AdamW(policy.lm.parameters(), lr=recipe.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    rng = random.Random(recipe.seed)
    order: list[int] = []
    policy.lm.train()
    for step in range(steps):
        if len(order) < recipe.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[i] for i in order[:recipe.batch_size]]
        del order[:recipe.batch_size]
        ids, mask = padded_batch([ids for ids, _ in batch], tokenizer.pad_token_id)
        logits = policy.lm(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = ids[:, 1:].clone()
        for row, (_, n_prompt) in enumerate(batch):  # learn the response and EOS only
            targets[row, :n_prompt - 1] = -100
        targets[mask[:, 1:] == 0] = -100
        loss = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                        targets.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.lm.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("sft step %d/%d loss %.4f", step + 1, steps, loss.item())
    policy.lm.eval()
    policy.save(out)
    return policy
