"""What the PPO trainer asks of a task: prompts for each iteration and, optionally, a judge.

The trainer knows no task; the synthetic one (prompts.SyntheticPrompts, oracle.OracleJudge) and
a user's prompt file (prompts.FilePrompts, no judge) are passed in by their callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class PromptSource(Protocol):
    def prompts(self, iteration: int, n: int) -> list[str]:
        """The `n` prompts of `iteration`: a function of the source's seed and the iteration
        alone, so that a resumed run sees what an uninterrupted one would."""
        ...

    def spec(self) -> dict[str, Any]:
        """What config.json records, e.g. {"kind": "synthetic", "seed": 3}; enough to rebuild
        the same source when the run is resumed."""
        ...


@dataclass(frozen=True)
class Verdict:
    errors: int      # errors the judge finds (wrong facts, arithmetic, rude, repeated, off topic)
    facts: int       # correct facts about what the prompt asks about

    @property
    def answered(self) -> bool:
        return self.facts > 0

    def rank(self) -> tuple[bool, int]:
        return self.answered, -self.errors


class Judge(Protocol):
    """An independent check of responses (not the reward model); the log reports its verdicts."""

    def verdict(self, prompt: str, response: str) -> Verdict: ...
