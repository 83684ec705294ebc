"""The demo models, shipped with the package, all of the synthetic task (tokenrm.training.synth:
a response about a person, checked against the facts in the prompt) and trained by the demo
recipe; `tokenrm demo --rebuild` trains them again:

- demo-token-rm: the token reward model the server runs by default;
- demo-seq-rm: a sequence-level (Bradley-Terry) reward model of the same pairs, the baseline
  of `tokenrm experiment fine-vs-seq`;
- demo-policy: the SFT policy that PPO starts from (the token RM's tokenizer).

Shipped rather than built on first use so that every machine starts from the same models.
Torch-free: this module only says where the checkpoints are."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

NAME = "demo-token-rm"  # the checkpoint directory, so the name the server reports for it
SEQ_NAME = "demo-seq-rm"
POLICY_NAME = "demo-policy"


def checkpoint(name: str = NAME) -> Path:
    """A shipped checkpoint's directory (the token reward model's by default)."""
    return Path(str(files("tokenrm.demo") / name))
