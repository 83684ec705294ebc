"""Named recipes for a token reward model: backbone size, data size and optimiser settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    hidden_size: int = 96      # width of the Llama-style backbone
    layers: int = 3            # transformer blocks (2 learn to look facts up far less reliably)
    heads: int = 4             # attention heads (head dim = hidden_size / heads)
    intermediate_size: int = 192  # MLP width
    max_len: int = 640         # longest prompt + response, in tokens (RoPE: no learned positions)
    vocab_size: int = 640      # BPE vocabulary trained on the task's corpus
    epochs: float = 4.0        # passes over the training pairs
    batch_size: int = 32       # sequences per optimiser step (before accumulation)
    lr: float = 3e-3           # peak learning rate (cosine decay after warm-up)
    warmup_ratio: float = 0.05  # share of steps spent warming up
    weight_decay: float = 0.01
    edit_label_weight: float = 4.0  # loss weight of negative and positive tokens (neutral: 1)
    n_train: int = 12000       # pairs the demo model is trained on
    n_eval: int = 500          # held-out pairs written beside them

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


PRESETS = {
    # For tests: trains in seconds, learns little.
    "tiny": Preset(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_len=192,
                   vocab_size=400, epochs=2.0, batch_size=16, lr=3e-3, n_train=200, n_eval=50),
    # The server's built-in default model.
    "demo": Preset(),
}
