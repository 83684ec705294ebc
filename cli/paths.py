"""Path arguments checked where they are parsed: a missing or wrong path is one line naming the
flag and the path (`tokenrm eval-rm: error: argument --model: /x: no such directory`), before
anything heavy is imported or started."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _existing(text: str, kind: str) -> Path:
    """`text` as a path to an existing `kind` ("file" or "directory")."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such {kind}")
    if not (path.is_dir() if kind == "directory" else path.is_file()):
        raise argparse.ArgumentTypeError(f"{text}: not a {kind}")
    return path


def _directory(text: str) -> Path:
    return _existing(text, "directory")


def checkpoint(text: str) -> Path:
    """A checkpoint directory (a Hugging Face one: config.json and weights)."""
    path = _directory(text)
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a checkpoint directory (no config.json)")
    return path


def pairs_dir(text: str) -> Path:
    """A directory of train.jsonl and eval.jsonl (what `tokenrm synth --out` writes)."""
    path = _directory(text)
    missing = [name for name in ("train.jsonl", "eval.jsonl") if not (path / name).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(f"{text}: no {' or '.join(missing)} in it (tokenrm "
                                         "synth --out DIR writes both)")
    return path


def existing_file(text: str) -> Path:
    return _existing(text, "file")


def out_dir(text: str) -> Path:
    """A directory to write into: it may not exist yet, but must not be a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a directory")
    return path
