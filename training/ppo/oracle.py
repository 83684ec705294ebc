"""The synthetic task's oracle, as PPO's judge and the experiment's use it.

A response must answer (state at least one correct fact about the person asked about); among
responses that answer, or among those that do not, fewer errors is better. So saying nothing
never beats an answer, and an answer with errors loses to one without.
"""

from __future__ import annotations

from tokenrm.training import synth
from tokenrm.training.ppo.task import Verdict

__all__ = ["OracleJudge", "Verdict", "preference", "verdict"]


def verdict(prompt: str, response: str) -> Verdict:
    return Verdict(len(synth.judge(prompt, response)), synth.correct_facts(prompt, response))


class OracleJudge:
    """The oracle as a PPO judge (task.Judge): the log's oracle_* fields come from it. It only
    reads prompts of the synthetic task."""

    def verdict(self, prompt: str, response: str) -> Verdict:
        return verdict(prompt, response)


def preference(mine: Verdict, theirs: Verdict) -> float:
    """1 if `mine` is the better response, 0.5 for a tie, 0 if `theirs` is."""
    a, b = mine.rank(), theirs.rank()
    return 1.0 if a > b else 0.5 if a == b else 0.0
