"""The PPO loop: rollouts scored by the server, r_t = rm_t - beta * KL_t, GAE, clipped updates.

Each iteration takes `prompts_per_iteration` prompts from its prompt source and samples
`samples_per_prompt` rollouts of each, in chunks of `generation_batch`; a chunk is sent for
scoring as soon as it is generated, so the server scores one chunk while the policy generates
the next. Every iteration appends one line to log.jsonl (with a judge, its verdicts too); the
run directory holds a checkpoint that `resume` continues from. The trainer knows no task: its
prompt source and judge are given (task.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from tokenrm.training.ppo import maths
from tokenrm.training.ppo.policy import Policy
from tokenrm.training.ppo.rewards import RewardSource
from tokenrm.training.ppo.rollout import Batch, Sampling, response_outputs, sample
from tokenrm.training.ppo.task import Judge, PromptSource, Verdict

log = logging.getLogger(__name__)

Mode = Literal["fine", "seq"]
STOPPED = "kl_budget"  # a log record's "stopped" when the run ended on its KL budget
CHECKPOINT, LOG, CONFIG = "checkpoint", "log.jsonl", "config.json"


@dataclass(frozen=True)
class PPOConfig:
    mode: Mode = "fine"              # fine: a reward per token; seq: the total on the last token
    score_norm: bool = True          # seq: scores normalised by their running mean and std
    iterations: int = 60
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 4
    generation_batch: int = 32       # rollouts generated (and sent for scoring) at once
    sampling: Sampling = field(default_factory=Sampling)
    beta: float = 0.05               # KL coefficient (the start value when adaptive)
    kl_target: float | None = 6.0    # per-sequence KL that an adaptive beta aims for; None: fixed
    kl_horizon: int = 320            # rollouts over which beta may change by e^(+-0.2)
    kl_budget: float | None = 15.0   # a policy past this KL per sequence is not kept: the run
                                     # goes back to its last policy within it and stops
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2                # policy ratio clip
    value_clip: float = 0.2
    value_coef: float = 0.1
    epochs: int = 4                  # passes over each iteration's rollouts
    minibatch: int = 16              # rollouts per optimiser step
    lr: float = 5e-5
    max_grad_norm: float = 1.0
    seed: int = 0
    prompt_seed: int = 3             # the seed callers give the prompt source (world, file order)
    save_every: int = 10             # iterations between checkpoints (and at the end)

    @property
    def rollouts_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PPOConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known} | {
            "sampling": Sampling(**d["sampling"])})


@dataclass
class Rollouts:
    prompts: list[str]
    prompt_ids: list[list[int]]
    responses: list[list[int]]
    rm: list[np.ndarray]             # per response token, EOS included
    generate_s: float = 0.0
    wait_s: float = 0.0              # blocked on rewards after the last chunk was generated
    seconds: float = 0.0


class Trainer:
    def __init__(self, policy: Policy, reference: Policy, rewards: RewardSource,
                 config: PPOConfig, out: Path, prompts: PromptSource,
                 judge: Judge | None = None) -> None:
        self.policy, self.reference, self.rewards, self.config = policy, reference, rewards, config
        self.out, self.prompt_source, self.judge = out, prompts, judge
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
        self.kl = maths.KLController(config.beta, config.kl_target, config.kl_horizon)
        self.scores = maths.RunningMoments()
        self.iteration = 0
        self.within_budget: dict[str, torch.Tensor] | None = None  # the last such policy
        self.stopped = False

    # --- rollouts ---------------------------------------------------------------------

    def rollouts(self) -> Rollouts:
        c, tok = self.config, self.policy.tokenizer
        started = time.perf_counter()
        drawn = self.prompt_source.prompts(self.iteration, c.prompts_per_iteration)
        assert len(drawn) == c.prompts_per_iteration, f"{len(drawn)} prompts from the source"
        prompts = [p for p in drawn for _ in range(c.samples_per_prompt)]
        prompt_ids = [list(tok(p)["input_ids"]) for p in prompts]
        responses: list[list[int]] = []
        pending = []
        generate_s = 0.0
        self.policy.eval()
        try:
            for start in range(0, len(prompts), c.generation_batch):
                t = time.perf_counter()
                chunk = sample(self.policy, prompt_ids[start:start + c.generation_batch],
                               c.sampling)
                generate_s += time.perf_counter() - t
                pending.append(self.rewards.submit(prompts[start:start + len(chunk)],
                                                   prompt_ids[start:start + len(chunk)], chunk))
                responses += chunk
            t = time.perf_counter()
            rm = [r for future in pending for r in future.result()]
            wait_s = time.perf_counter() - t
        finally:  # after a failure, no scoring call is left running
            for future in pending:
                future.cancel()
        return Rollouts(prompts, prompt_ids, responses, rm, generate_s, wait_s,
                        time.perf_counter() - started)

    # --- the update -------------------------------------------------------------------

    def step(self) -> dict[str, Any]:
        """One iteration: rollouts, rewards, advantages, PPO epochs. Returns its log record."""
        c = self.config
        torch.manual_seed(c.seed * 1_000_003 + self.iteration)
        ro = self.rollouts()
        started = time.perf_counter()
        batch = Batch.of(ro.prompt_ids, ro.responses, self.policy.tokenizer.pad_token_id)
        mask = batch.response_mask
        rm = torch.zeros_like(mask)
        for i, r in enumerate(ro.rm):
            rm[i, :len(r)] = torch.from_numpy(r)
        with torch.no_grad():
            old_logprobs, old_values, _ = response_outputs(self.policy, batch,
                                                           c.sampling.temperature)
            ref_logprobs, _, _ = response_outputs(self.reference, batch, c.sampling.temperature)
        rewards, kl = maths.kl_penalized(self._placed(rm, mask), old_logprobs, ref_logprobs,
                                         mask, self.kl.beta)
        kl_per_sequence = float(kl.sum(dim=1).mean())
        over_budget = c.kl_budget is not None and kl_per_sequence > c.kl_budget
        if c.kl_budget is not None and not over_budget:  # its sampler is within the budget
            self.within_budget = {k: v.detach().clone()
                                  for k, v in self.policy.state_dict().items()}
        advantages, returns = maths.gae(rewards, old_values * mask, mask, c.gamma, c.lam)
        advantages = maths.whiten(advantages, mask)
        stats = self._epochs(batch, old_logprobs, old_values, advantages, returns)
        beta = self.kl.beta
        self.kl.update(kl_per_sequence, len(ro.responses))
        self.iteration += 1
        if over_budget:
            self._stop()
        return {**({"stopped": STOPPED} if self.stopped else {}),
            "iteration": self.iteration,
            "rollouts": self.iteration * c.rollouts_per_iteration,
            "rm_reward": float(np.mean([r.sum() for r in ro.rm])),
            "kl": kl_per_sequence, "beta": beta, **stats, **self._judged(ro),
            "response_tokens": float(mask.sum(dim=1).mean()),
            "rollout_s": ro.seconds, "generate_s": ro.generate_s,
            "reward_wait_share": ro.wait_s / ro.seconds,
            "update_s": time.perf_counter() - started,
        }

    def _placed(self, rm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The rewards PPO sees: per token (fine), or each response's total on its last token
        (seq; normalised by the running moments when config.score_norm)."""
        if self.config.mode == "fine":
            return rm
        scores = (rm * mask).sum(dim=1)
        return maths.on_last_token(self.scores.normalize(scores) if self.config.score_norm
                                   else scores, mask)

    def _stop(self) -> None:
        """Past the KL budget: back to the last policy within it (the starting one if none), and
        no more iterations."""
        if self.within_budget is not None:
            self.policy.load_state_dict(self.within_budget)
        else:
            self.policy.load_state_dict(self.reference.state_dict())
        self.stopped = True
        log.warning("iteration %d: KL per sequence past the budget of %s; the run keeps its last "
                    "policy within it and stops", self.iteration, self.config.kl_budget)

    def _judged(self, ro: Rollouts) -> dict[str, float]:
        """The judge's verdicts on the rollouts (oracle_* fields); none without a judge."""
        if self.judge is None:
            return {}
        texts = [self.policy.tokenizer.decode(r, skip_special_tokens=True) for r in ro.responses]
        verdicts: list[Verdict] = [self.judge.verdict(p, t)
                                   for p, t in zip(ro.prompts, texts, strict=True)]
        return {"oracle_error_rate": float(np.mean([v.errors > 0 for v in verdicts])),
                "oracle_errors": float(np.mean([v.errors for v in verdicts])),
                "oracle_answered": float(np.mean([v.answered for v in verdicts]))}

    def _epochs(self, batch: Batch, old_logprobs: torch.Tensor, old_values: torch.Tensor,
                advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        c = self.config
        mask = batch.response_mask
        totals: dict[str, list[float]] = {k: [] for k in
                                          ("policy_loss", "value_loss", "entropy",
                                           "clip_fraction", "approx_kl")}
        self.policy.train()
        for _ in range(c.epochs):
            order = torch.randperm(len(mask))
            for start in range(0, len(mask), c.minibatch):
                rows = order[start:start + c.minibatch]
                mb = batch.select(rows)
                logprobs, values, logits = response_outputs(self.policy, mb,
                                                            c.sampling.temperature)
                m = mask[rows]
                pl = maths.policy_loss(logprobs, old_logprobs[rows], advantages[rows], m, c.clip)
                vl = maths.value_loss(values, old_values[rows], returns[rows], m, c.value_clip)
                self.optimizer.zero_grad()
                (pl.loss + c.value_coef * vl).backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    totals["entropy"].append(float(maths.entropy(logits, m)))
                totals["policy_loss"].append(pl.loss.item())
                totals["value_loss"].append(vl.item())
                totals["clip_fraction"].append(pl.clip_fraction)
                totals["approx_kl"].append(pl.approx_kl)
        self.policy.eval()
        return {k: float(np.mean(v)) for k, v in totals.items()}

    # --- checkpoints ------------------------------------------------------------------

    def save(self) -> None:
        """Write the checkpoint next to the old one, then swap: a crash leaves one intact."""
        target = self.out / CHECKPOINT
        staging = self.out / f".{CHECKPOINT}-new"
        shutil.rmtree(staging, ignore_errors=True)
        self.policy.save(staging)
        torch.save({"optimizer": self.optimizer.state_dict(), "beta": self.kl.beta,
                    "iteration": self.iteration, "scores": asdict(self.scores),
                    "stopped": self.stopped, "within_budget": self.within_budget},
                   staging / "trainer.pt")
        old = self.out / f".{CHECKPOINT}-old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)

    def restore(self) -> None:
        state = torch.load(self.out / CHECKPOINT / "trainer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl.beta, self.iteration = state["beta"], state["iteration"]
        self.scores = maths.RunningMoments(**state["scores"])
        self.stopped, self.within_budget = state["stopped"], state["within_budget"]

    def run(self, on_iteration: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Iterate up to config.iterations, logging each and checkpointing as configured."""
        c = self.config
        with (self.out / LOG).open("a") as log_file:
            while self.iteration < c.iterations and not self.stopped:
                try:
                    record = self.step()
                except BaseException:  # keep every finished iteration, then stop
                    if self.iteration % c.save_every or not (self.out / CHECKPOINT).exists():
                        self.save()
                    raise
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if (self.iteration % c.save_every == 0 or self.iteration == c.iterations
                        or self.stopped):
                    self.save()
                if on_iteration:
                    on_iteration(record)
