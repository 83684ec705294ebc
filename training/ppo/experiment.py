"""`tokenrm experiment fine-vs-seq`: PPO with a reward per token against PPO with one reward per
response, at an equal rollout budget over several seeds, each policy judged against the SFT
policy by the task's oracle on held-out prompts.

Three arms (ARMS), the same PPO settings for all but how the reward is placed:
- fine: the token RM's reward on every token (Xu et al.'s fine-grained PPO);
- seq: a Bradley-Terry sequence RM's score on the last token (the paper's baseline, standard
  RLHF);
- seq-total: the token RM's total on the last token (an ablation: the same RM, coarse credit).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
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
from tokenrm.training.ppo.rollout import Batch, Sampling, response_outputs, sample
from tokenrm.training.ppo.run import Connection, describe
from tokenrm.training.ppo.run_dir import open_run
from tokenrm.training.ppo.trainer import Mode, PPOConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    mode: Mode
    rm: str          # which reward model: "token" or "pairwise" (a key of the connections)
    name: str        # as the report says it


ARMS = {"fine": Arm("fine", "token", "fine-grained (token RM)"),
        "seq": Arm("seq", "pairwise", "sequence-level (Bradley-Terry RM)"),
        "seq-total": Arm("seq", "token", "sequence-level (token RM's total)")}


@dataclass(frozen=True)
class Experiment:
    ppo: PPOConfig                   # everything but mode and seed, shared by all runs
    seeds: Sequence[int] = (0, 1, 2)
    arms: Sequence[str] = tuple(ARMS)
    eval_every: int = 10             # iterations between win-rate evaluations
    eval_prompts: int = 300          # held-out prompts (a world no training prompt comes from)
    eval_seed: int = 4


def held_out_prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    world = synth.make_world(rng, 2000)
    return [synth.make_prompt(rng, rng.choice(world)) for _ in range(n)]


class Judge:
    """Win rate of a policy's responses against the reference's on fixed held-out prompts, by
    the oracle's preference (see oracle.py; ties count half), and the policy's KL from the
    reference on its own responses. Sampling uses a fixed seed, so the reference judged against
    itself scores exactly 0.5 at KL 0."""

    def __init__(self, reference: Policy, prompts: list[str], sampling: Sampling,
                 seed: int, batch: int = 64) -> None:
        self.prompts, self.sampling, self.seed, self.batch = prompts, sampling, seed, batch
        self.reference_policy = reference
        tok = reference.tokenizer
        self.prompt_ids = [list(tok(p)["input_ids"]) for p in prompts]
        self.reference, self.reference_tokens, _ = self.judged(reference)

    def judged(self, policy: Policy) -> tuple[list[Verdict], np.ndarray, float]:
        """The oracle's verdict on each prompt's response, the responses' lengths, and the mean
        sum over response tokens of log pi - log pi_ref (the KL estimate on these samples)."""
        torch.manual_seed(self.seed)
        tok = policy.tokenizer
        responses: list[list[int]] = []
        kl: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(self.prompts), self.batch):
                ids = self.prompt_ids[start:start + self.batch]
                got = sample(policy, ids, self.sampling)
                batch = Batch.of(ids, got, tok.pad_token_id)
                mine, _, _ = response_outputs(policy, batch, self.sampling.temperature)
                ref, _, _ = response_outputs(self.reference_policy, batch,
                                             self.sampling.temperature)
                kl.append(((mine - ref) * batch.response_mask).sum(dim=1))
                responses += got
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        return ([verdict(p, t) for p, t in zip(self.prompts, texts, strict=True)],
                np.array([len(r) for r in responses]), float(torch.cat(kl).mean()))

    def evaluate(self, policy: Policy) -> dict[str, Any]:
        """Win rate against the reference (and each prompt's preference); mean errors, facts,
        answered share, tokens and KL."""
        mine, tokens, kl = self.judged(policy)
        prefs = [preference(m, r) for m, r in zip(mine, self.reference, strict=True)]
        return {"win_rate": float(np.mean(prefs)), **summary(mine),
                "tokens": float(tokens.mean()), "kl": kl, "preferences": prefs}

    def silent_win_rate(self) -> float:
        """What a policy that says nothing would score: the bar an answer must clear."""
        return float(np.mean([preference(Verdict(0, 0), r) for r in self.reference]))


def summary(verdicts: Sequence[Verdict]) -> dict[str, float]:
    return {"errors": float(np.mean([v.errors for v in verdicts])),
            "facts": float(np.mean([v.facts for v in verdicts])),
            "answered": float(np.mean([v.answered for v in verdicts]))}


def run_experiment(out: Path, exp: Experiment, connections: Mapping[str, Connection],
                   policy_dir: Path) -> dict[str, Any]:
    """Train every (arm, seed) run from `policy_dir`, evaluating as it goes; write
    results.json, fine-vs-seq.md and fine-vs-seq.png into `out`. `connections` has a server
    of each reward model the arms use ("token", "pairwise")."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reference = Policy.load(policy_dir)
    judge = Judge(reference, held_out_prompts(exp.eval_seed, exp.eval_prompts),
                  exp.ppo.sampling, exp.eval_seed)
    runs: list[dict[str, Any]] = []
    clients = {rm: RewardClient(c.urls, api_key=c.api_key, timeout_s=c.timeout_s)
               for rm, c in connections.items() if rm in {ARMS[a].rm for a in exp.arms}}
    try:
        for seed in exp.seeds:
            for name in exp.arms:
                arm = ARMS[name]
                config = replace(exp.ppo, mode=arm.mode, seed=seed, prompt_seed=100 + seed)
                runs.append({"arm": name, **_one_run(
                    name, out / f"{name}-seed{seed}", config, exp, judge,
                    _source(clients[arm.rm], connections[arm.rm]), policy_dir)})
    finally:
        for client in clients.values():
            client.close()
    reference_point = {**summary(judge.reference), "tokens": float(judge.reference_tokens.mean()),
                       "silent_win_rate": judge.silent_win_rate()}
    result = {"config": {"ppo": exp.ppo.to_dict(), "seeds": list(exp.seeds),
                         "arms": list(exp.arms), "eval_every": exp.eval_every,
                         "eval_prompts": exp.eval_prompts},
              "reference": reference_point, "runs": runs,
              "seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    from tokenrm.training.ppo.report import plot, table  # matplotlib only when reporting

    (out / "fine-vs-seq.md").write_text(table(result))
    plot(result, out / "fine-vs-seq.png")
    return result


def _source(client: RewardClient, c: Connection) -> Callable[[Policy], RewardSource]:
    return lambda policy: RewardSource(client, policy.tokenizer, c.send, c.timeout_s)


def _one_run(arm: str, out: Path, config: PPOConfig, exp: Experiment, judge: Judge,
             rewards: Callable[[Policy], RewardSource], policy_dir: Path) -> dict[str, Any]:
    trainer = open_run(out, config, policy_dir, rewards, resume=False,
                       prompts=SyntheticPrompts(config.prompt_seed), judge=OracleJudge())
    curve = [{"iteration": 0, "rollouts": 0, **judge.evaluate(trainer.policy)}]
    history: list[dict[str, Any]] = []

    def evaluate(record: dict[str, Any]) -> None:
        history.append(record)
        log.info("%s seed %d iteration %d: %s", arm, config.seed, record["iteration"],
                 describe(record))
        if (record["iteration"] % exp.eval_every == 0 or "stopped" in record
                or record["iteration"] == config.iterations):
            curve.append({"iteration": record["iteration"], "rollouts": record["rollouts"],
                          **judge.evaluate(trainer.policy)})
            log.info("  win rate vs SFT %.3f at KL %.2f", curve[-1]["win_rate"],
                     curve[-1]["kl"])

    trainer.run(evaluate)
    final = dict(curve[-1])  # each prompt's preference is kept for the final policy only
    for point in curve:
        del point["preferences"]
    return {"mode": config.mode, "seed": config.seed, "curve": curve,
            "rewards": [[r["rollouts"], r["rm_reward"]] for r in history],
            "final": {**final, "rm_reward": history[-1]["rm_reward"],
                      "stopped": history[-1].get("stopped"), "beta": trainer.kl.beta},
            "reward_wait_share": float(np.mean([r["reward_wait_share"] for r in history]))}
