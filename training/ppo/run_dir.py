"""The run directory: a new PPO run in it, or the one saved there resumed (its config.json, log
and checkpoint; see trainer.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenrm.training.ppo.policy import Policy
from tokenrm.training.ppo.rewards import RewardSource
from tokenrm.training.ppo.task import Judge, PromptSource
from tokenrm.training.ppo.trainer import CHECKPOINT, CONFIG, LOG, PPOConfig, Trainer


def trim_log(path: Path, iterations: int) -> None:
    """Keep the log lines of the first `iterations` iterations (those a checkpoint holds)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines()
             if line and json.loads(line)["iteration"] <= iterations]
    path.write_text("".join(f"{line}\n" for line in lines))


def stored_config(out: Path) -> dict[str, Any]:
    """The config.json of the run saved in `out` (FileNotFoundError when there is none)."""
    if not (out / CHECKPOINT).exists():
        raise FileNotFoundError(f"{out}: no checkpoint to resume from")
    stored: dict[str, Any] = json.loads((out / CONFIG).read_text())
    return stored


def open_run(out: Path, config: PPOConfig, policy_dir: Path | None,
             rewards: Callable[[Policy], RewardSource], resume: bool, prompts: PromptSource,
             judge: Judge | None = None) -> Trainer:
    """A trainer for a new run in `out` (which must not hold one) starting from the policy in
    `policy_dir`, or, with `resume`, for the run saved in `out` (its own config and policy; only
    `config.iterations` is taken from the caller, and `prompts` must be the source it recorded).
    config.json records the prompt source's spec under "prompts"."""
    saved = out / CHECKPOINT
    if resume:
        stored = stored_config(out)
        if stored.get("prompts", prompts.spec()) != prompts.spec():
            raise ValueError(f"{out}: the run was trained on the prompts {stored['prompts']}, "
                             f"not {prompts.spec()}")
        config = PPOConfig.from_dict(stored | {"iterations": config.iterations})
        policy = Policy.load(saved)
        reference = Policy.load(Path(stored["policy"])).frozen_copy()
        trainer = Trainer(policy, reference, rewards(policy), config, out, prompts, judge)
        trainer.restore()
        trim_log(out / LOG, trainer.iteration)
        return trainer
    if policy_dir is None:
        raise ValueError("a new run needs the starting policy")
    if (out / LOG).exists() or saved.exists():
        raise FileExistsError(f"{out}: holds a run already; resume it or choose another --out")
    policy = Policy.load(policy_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps({**config.to_dict(), "policy": str(policy_dir),
                                          "prompts": prompts.spec()}, indent=2) + "\n")
    return Trainer(policy, policy.frozen_copy(), rewards(policy), config, out, prompts, judge)
