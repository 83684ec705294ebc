"""The demo model, shipped with the package: a token reward model of the synthetic task
(tokenrm.training.synth: a response about a person, checked against the facts in the prompt),
trained by the demo recipe; `tokenrm demo --rebuild` trains it again into demo-token-rm/.
Torch-free: this module only says where the checkpoint is."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

NAME = "demo-token-rm"  # the checkpoint directory, so the name the server reports for it


def checkpoint() -> Path:
    """The shipped checkpoint's directory."""
    return Path(str(files("tokenrm.demo") / NAME))
