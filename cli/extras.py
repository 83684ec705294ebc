"""What to install when a command meets a package that is not installed (pyproject.toml's
extras): one line instead of a traceback."""

from __future__ import annotations

import importlib.util
import re

# The extra that brings each package a command may import
EXTRA_OF = {"torch": "server", "transformers": "server", "fastapi": "server",
            "uvicorn": "server", "sklearn": "train", "accelerate": "train",
            "matplotlib": "train", "ray": "ray"}
# Commands that train or judge models: [train] brings all they need
TRAINING_COMMANDS = frozenset({"train-rm", "eval-rm", "demo", "experiment"})


def require(*packages: str) -> None:
    """Fail now, before any work, when one of `packages` is not installed."""
    for name in packages:
        if not _installed(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def advice(exc: ImportError, command: str) -> str | None:
    """'needs X ... pip install' when `exc` comes from a package of an extra that is not
    installed (a ModuleNotFoundError naming it, or a library's ImportError saying it needs
    it); None otherwise (a broken install or a bug: the traceback tells more)."""
    top = (exc.name or "").split(".")[0]
    missing = sorted(name for name in EXTRA_OF
                     if (name == top or re.search(rf"\b{name}\b", str(exc)))
                     and not _installed(name))
    if not missing:
        return None
    extras = {EXTRA_OF[name] for name in missing}
    extra = ("train" if "train" in extras or command in TRAINING_COMMANDS
             else "ray" if "ray" in extras else "server")
    return f"needs {', '.join(missing)}, which is not installed: pip install 'tokenrm[{extra}]'"


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # in sys.modules without a spec: it is there
        return True
