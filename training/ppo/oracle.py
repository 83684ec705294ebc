"""The synthetic task's oracle, as PPO's logs and the experiment's judge use it.

A response must answer (state at least one correct fact about the person asked about); among
responses that answer, or among those that do not, fewer errors is better. So saying nothing
never beats an answer, and an answer with errors loses to one without.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenrm.training import synth


@dataclass(frozen=True)
class Verdict:
    errors: int      # errors the judge finds (wrong facts, arithmetic, rude, repeated, off topic)
    facts: int       # correct facts about the person asked about

    @property
    def answered(self) -> bool:
        return self.facts > 0

    def rank(self) -> tuple[bool, int]:
        return self.answered, -self.errors


def verdict(prompt: str, response: str) -> Verdict:
    return Verdict(len(synth.judge(prompt, response)), synth.correct_facts(prompt, response))


def preference(mine: Verdict, theirs: Verdict) -> float:
    """1 if `mine` is the better response, 0.5 for a tie, 0 if `theirs` is."""
    a, b = mine.rank(), theirs.rank()
    return 1.0 if a > b else 0.5 if a == b else 0.0
