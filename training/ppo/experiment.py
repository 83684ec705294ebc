"""`tokenrm experiment fine-vs-seq`: fine-grained vs sequence-level PPO at an equal rollout
budget over several seeds, each policy judged against the SFT policy by the task's oracle."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenrm.client import RewardClient
from tokenrm.training import synth
from tokenrm.training.ppo.oracle import OracleJudge, Verdict, preference, verdict
from tokenrm.training.ppo.policy import Policy
from tokenrm.training.ppo.prompts import SyntheticPrompts
from tokenrm.training.ppo.rewards import RewardSource
from tokenrm.training.ppo.rollout import Sampling, sample
from tokenrm.training.ppo.run import Connection, describe
from tokenrm.training.ppo.trainer import Mode, PPOConfig, open_run

log = logging.getLogger(__name__)
MODES: tuple[Mode, ...] = ("fine", "seq")


@dataclass(frozen=True)
class Experiment:
    ppo: PPOConfig                   # everything but mode and seed, shared by all runs
    seeds: Sequence[int] = (0, 1, 2)
    eval_every: int = 10             # iterations between win-rate evaluations
    eval_prompts: int = 300          # held-out prompts (a world no training prompt comes from)
    eval_seed: int = 4


def held_out_prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    world = synth.make_world(rng, 2000)
    return [synth.make_prompt(rng, rng.choice(world)) for _ in range(n)]


class Judge:
    """Win rate of a policy's responses against the reference's on fixed held-out prompts, by
    the oracle's preference (see oracle.py; ties count half). Sampling uses a fixed seed, so the
    reference judged against itself scores exactly 0.5."""

    def __init__(self, reference: Policy, prompts: list[str], sampling: Sampling,
                 seed: int) -> None:
        self.prompts, self.sampling, self.seed = prompts, sampling, seed
        self.reference, self.reference_tokens = self.judged(reference)

    def judged(self, policy: Policy, batch: int = 64) -> tuple[list[Verdict], np.ndarray]:
        """The oracle's verdict on each prompt's response, and the responses' lengths."""
        torch.manual_seed(self.seed)
        tok = policy.tokenizer
        responses: list[list[int]] = []
        for start in range(0, len(self.prompts), batch):
            ids = [list(tok(p)["input_ids"]) for p in self.prompts[start:start + batch]]
            responses += sample(policy, ids, self.sampling)
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        return ([verdict(p, t) for p, t in zip(self.prompts, texts, strict=True)],
                np.array([len(r) for r in responses]))

    def evaluate(self, policy: Policy) -> dict[str, float]:
        """Win rate against the reference; mean errors, facts, answered share and tokens."""
        mine, tokens = self.judged(policy)
        return {"win_rate": float(np.mean([preference(m, r) for m, r in
                                           zip(mine, self.reference, strict=True)])),
                **summary(mine), "tokens": float(tokens.mean())}

    def silent_win_rate(self) -> float:
        """What a policy that says nothing would score: the bar an answer must clear."""
        return float(np.mean([preference(Verdict(0, 0), r) for r in self.reference]))


def summary(verdicts: Sequence[Verdict]) -> dict[str, float]:
    return {"errors": float(np.mean([v.errors for v in verdicts])),
            "facts": float(np.mean([v.facts for v in verdicts])),
            "answered": float(np.mean([v.answered for v in verdicts]))}


def run_experiment(out: Path, exp: Experiment, connection: Connection, policy_dir: Path
                   ) -> dict[str, Any]:
    """Train every (mode, seed) run from `policy_dir`, evaluating as it goes; write
    results.json, fine-vs-seq.md and fine-vs-seq.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reference = Policy.load(policy_dir)
    judge = Judge(reference, held_out_prompts(exp.eval_seed, exp.eval_prompts),
                  exp.ppo.sampling, exp.eval_seed)
    runs: list[dict[str, Any]] = []
    with RewardClient(connection.urls, api_key=connection.api_key,
                      timeout_s=connection.timeout_s) as client:
        for seed in exp.seeds:
            for mode in MODES:
                config = replace(exp.ppo, mode=mode, seed=seed, prompt_seed=100 + seed)
                runs.append(_one_run(out / f"{mode}-seed{seed}", config, exp, judge,
                                     lambda p: RewardSource(client, p.tokenizer, connection.send,
                                                            connection.timeout_s),
                                     policy_dir))
    result = {"config": {"ppo": exp.ppo.to_dict(), "seeds": list(exp.seeds),
                         "eval_every": exp.eval_every, "eval_prompts": exp.eval_prompts},
              "reference": {**summary(judge.reference),
                            "tokens": float(judge.reference_tokens.mean()),
                            "silent_win_rate": judge.silent_win_rate()},
              "runs": runs, "seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    from tokenrm.training.ppo.report import plot, table  # matplotlib only when reporting

    (out / "fine-vs-seq.md").write_text(table(result))
    plot(result, out / "fine-vs-seq.png")
    return result


def _one_run(out: Path, config: PPOConfig, exp: Experiment, judge: Judge, rewards: Any,
             policy_dir: Path) -> dict[str, Any]:
    trainer = open_run(out, config, policy_dir, rewards, resume=False,
                       prompts=SyntheticPrompts(config.prompt_seed), judge=OracleJudge())
    curve = [{"iteration": 0, "rollouts": 0, **judge.evaluate(trainer.policy)}]
    history: list[dict[str, Any]] = []

    def evaluate(record: dict[str, Any]) -> None:
        history.append(record)
        log.info("%s seed %d iteration %d: %s", config.mode, config.seed, record["iteration"],
                 describe(record))
        if record["iteration"] % exp.eval_every == 0 or record["iteration"] == config.iterations:
            curve.append({"iteration": record["iteration"], "rollouts": record["rollouts"],
                          **judge.evaluate(trainer.policy)})
            log.info("  win rate vs SFT %.3f", curve[-1]["win_rate"])

    trainer.run(evaluate)
    return {"mode": config.mode, "seed": config.seed, "curve": curve,
            "rewards": [[r["rollouts"], r["rm_reward"]] for r in history],
            "final": {**curve[-1], "kl": history[-1]["kl"], "rm_reward": history[-1]["rm_reward"]},
            "reward_wait_share": float(np.mean([r["reward_wait_share"] for r in history]))}

