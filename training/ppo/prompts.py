"""PPO's prompt sources: the synthetic task's generated prompts, or a user's JSONL file.

A prompt file holds one JSON object per line with a string "prompt" (other keys are ignored;
blank lines are skipped): {"prompt": "Where does Ana live?"}
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenrm.training import synth
from tokenrm.training.data import DataError, json_object, json_type
from tokenrm.training.ppo.task import PromptSource


class SyntheticPrompts:
    """Questions about people of a world made from the seed (the synthetic task's prompts)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def prompts(self, iteration: int, n: int) -> list[str]:
        rng = random.Random(self.seed * 1_000_003 + iteration)
        world = _world(self.seed)
        return [synth.make_prompt(rng, rng.choice(world)) for _ in range(n)]

    def spec(self) -> dict[str, Any]:
        return {"kind": "synthetic", "seed": self.seed}


@functools.cache
def _world(seed: int) -> list[synth.Person]:
    """The people training prompts ask about: made once per seed, not once per iteration."""
    return synth.make_world(random.Random(seed), 4000)


class FilePrompts:
    """A file's prompts in a seeded order: a new shuffle of the whole file on each pass, taken
    `n` at a time, so every prompt is used once before any is used again."""

    def __init__(self, path: Path, texts: Sequence[str], seed: int, sha256: str) -> None:
        assert texts, "a prompt file with no prompts"
        self.path, self.texts, self.seed, self.sha256 = path, list(texts), seed, sha256
        self._orders: dict[int, list[int]] = {}

    @classmethod
    def load(cls, path: Path, seed: int) -> FilePrompts:
        """Read the file; a missing file is FileNotFoundError, a malformed one DataError whose
        message starts with path:line."""
        path = Path(path).absolute()
        data = _read(path)
        return cls(path, _parse(data, path), seed, hashlib.sha256(data).hexdigest())

    def prompts(self, iteration: int, n: int) -> list[str]:
        return [self._at(position) for position in range(iteration * n, (iteration + 1) * n)]

    def _at(self, position: int) -> str:
        epoch, i = divmod(position, len(self.texts))
        if epoch not in self._orders:
            order = list(range(len(self.texts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders[epoch] = order
        return self.texts[self._orders[epoch][i]]

    def spec(self) -> dict[str, Any]:
        return {"kind": "file", "path": str(self.path), "seed": self.seed, "sha256": self.sha256}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such prompt file") from None
    except OSError as exc:  # a directory, no permission
        raise DataError(f"{path}: cannot read the prompt file ({exc.strerror})") from None


def _parse(data: bytes, path: Path) -> list[str]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # split("\n"), not splitlines(): JSON strings may hold U+2028, which is no line break here.
    texts = [_prompt(line, f"{path}:{number}")
             for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not texts:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return texts


def _prompt(line: str, where: str) -> str:
    row = json_object(line, where)
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt'")
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {json_type(prompt)}")
    if not prompt.strip():
        raise DataError(f"{where}: field 'prompt' is empty")
    return prompt


def rebuild(spec: dict[str, Any] | None, prompt_seed: int) -> PromptSource:
    """The source a run's config.json records (`spec`), for --resume. Runs from before sources
    were recorded (no spec) used the synthetic prompts of their `prompt_seed`."""
    if spec is None:
        return SyntheticPrompts(prompt_seed)
    if spec.get("kind") == "synthetic":
        return SyntheticPrompts(int(spec["seed"]))
    if spec.get("kind") != "file":
        raise ValueError(f"config.json: unknown prompt source {spec.get('kind')!r}")
    path = Path(spec["path"])
    if not path.exists():
        raise FileNotFoundError(f"{path}: the run's prompt file (named in its config.json) is "
                                "gone; put it back to resume the run")
    source = FilePrompts.load(path, int(spec["seed"]))
    if spec.get("sha256", source.sha256) != source.sha256:
        raise DataError(f"{path}: the prompt file changed since the run began (its sha256 is not "
                        "the one in config.json); a resumed run would see other prompts")
    return source


def describe_source(spec: dict[str, Any]) -> str:
    """A source's spec for people: "the prompt file /x/p.jsonl (seed 3)"."""
    what = (f"the prompt file {spec.get('path')}" if spec.get("kind") == "file" else
            "the synthetic task's prompts" if spec.get("kind") == "synthetic" else
            f"prompts of kind {spec.get('kind')!r}")
    return f"{what} (seed {spec.get('seed')})"
