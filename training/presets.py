"""Named recipes for a token reward model: backbone size, data size and optimiser settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    hidden_size: int = 128     # width of the Llama-style backbone
    layers: int = 4            # transformer blocks
    heads: int = 4             # attention heads (head dim = hidden_size / heads)
    intermediate_size: int = 256  # MLP width
    max_len: int = 256         # longest prompt + response, in tokens
    rope_theta: float = 1e4    # RoPE base; larger bases keep far-apart tokens easier to match
    vocab_size: int = 640      # BPE vocabulary trained on the task's corpus
    lm_epochs: float = 4.0     # causal-LM pretraining passes over the edited responses (0: none)
    lm_lr: float = 3e-3        # peak learning rate of the LM pretraining
    epochs: float = 1.0        # token-label passes over the training pairs
    batch_size: int = 32       # sequences per optimiser step (before accumulation)
    lr: float = 1e-3           # peak learning rate (cosine decay after warm-up)
    warmup_ratio: float = 0.05  # share of steps spent warming up
    weight_decay: float = 0.01
    n_train: int = 6000        # pairs that `tokenrm synth` writes for this preset
    n_eval: int = 500          # held-out pairs written beside them

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


PRESETS = {
    # For tests: trains in seconds, learns little.
    "tiny": Preset(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_len=192,
                   vocab_size=400, lm_epochs=1.0, epochs=2.0, batch_size=16, lr=3e-3, n_train=200,
                   n_eval=50),
    # The server's built-in default model.
    "demo": Preset(),
}
