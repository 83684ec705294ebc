"""`tokenrm ppo`: fine-grained (or sequence-level) PPO of a policy against a running server.

Its prompts are the synthetic task's, judged by the task's oracle, unless the caller gives a
prompt source (and, optionally, a judge); a resumed run rebuilds what its config.json records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tokenrm.client import RewardClient, RewardClientError
from tokenrm.training.ppo.oracle import OracleJudge
from tokenrm.training.ppo.policy import Policy
from tokenrm.training.ppo.prompts import SyntheticPrompts, describe_source, rebuild
from tokenrm.training.ppo.rewards import RewardSource, Send
from tokenrm.training.ppo.run_dir import open_run, stored_config
from tokenrm.training.ppo.task import Judge, PromptSource
from tokenrm.training.ppo.trainer import CHECKPOINT, LOG, PPOConfig, Trainer


class PPOError(Exception):
    """The run stopped; the message says why and what was kept."""


@dataclass(frozen=True)
class Connection:
    urls: Sequence[str]              # grpc://host:port (default) or http://host:port; several ok
    api_key: str | None = None
    send: Send = "auto"
    timeout_s: float = 600.0         # per scoring call, retries included (covers a restart)
    connect_timeout_s: float = 30.0  # for the first contact (the model's info) at start


def progress_bar(total: int, done: int, enabled: bool) -> Progress:
    bar = Progress(TextColumn("PPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), disable=not enabled)
    bar.add_task("", total=total, completed=done)
    return bar


def describe(record: dict[str, Any]) -> str:
    errors = (f"errors {record['oracle_error_rate']:.0%}  " if "oracle_error_rate" in record
              else "")
    return (f"reward {record['rm_reward']:+.3f}  KL {record['kl']:.3f}  "
            f"{errors}wait {record['reward_wait_share']:.0%}")


def synthetic_task(config: PPOConfig) -> tuple[PromptSource, Judge]:
    """The synthetic task's prompts (of `config.prompt_seed`) and its oracle as the judge."""
    return SyntheticPrompts(config.prompt_seed), OracleJudge()


def resumed_task(out: Path) -> tuple[PromptSource, Judge | None]:
    """The prompt source the run in `out` recorded; the synthetic task keeps its oracle, a
    prompt file has no judge."""
    stored = stored_config(out)
    source = rebuild(stored.get("prompts"), PPOConfig.from_dict(stored).prompt_seed)
    return source, OracleJudge() if isinstance(source, SyntheticPrompts) else None


def _task(out: Path, config: PPOConfig, resume: bool, prompts: PromptSource | None,
          judge: Judge | None) -> tuple[PromptSource, Judge | None]:
    if not resume:
        return (prompts, judge) if prompts is not None else synthetic_task(config)
    recorded = resumed_task(out)
    if prompts is None:
        return recorded
    if prompts.spec() != recorded[0].spec():
        raise ValueError(f"{out}: the run was trained on {describe_source(recorded[0].spec())}, "
                         f"not {describe_source(prompts.spec())}; --resume goes on with the "
                         "run's own prompts")
    return prompts, judge


def run_ppo(out: Path, config: PPOConfig, connection: Connection, policy_dir: Path | None,
            resume: bool = False, progress: bool = True, prompts: PromptSource | None = None,
            judge: Judge | None = None) -> Trainer:
    """Train (or go on training) the run in `out`; returns the trainer at its last iteration.

    With `prompts` (and `judge`, None for none) given, those are used (a resumed run's must be
    the ones it recorded); without, a new run uses `synthetic_task(config)` and a resumed one
    `resumed_task(out)`."""
    try:
        prompts, judge = _task(out, config, resume, prompts, judge)
    except (ValueError, OSError) as exc:  # no run to resume, its prompt file gone or changed
        raise PPOError(str(exc)) from exc
    with RewardClient(connection.urls, api_key=connection.api_key,
                      timeout_s=connection.timeout_s) as client:
        try:
            client.model_info(connection.connect_timeout_s)
        except RewardClientError as exc:
            raise PPOError(f"cannot use the reward server at {', '.join(connection.urls)}: "
                           f"{type(exc).__name__}: {exc}") from exc

        def rewards(policy: Policy) -> RewardSource:
            return RewardSource(client, policy.tokenizer, connection.send, connection.timeout_s)

        try:
            trainer = open_run(out, config, policy_dir, rewards, resume, prompts, judge)
        except (ValueError, OSError) as exc:  # a wrong --send, a used or empty --out
            raise PPOError(str(exc)) from exc
        try:
            with progress_bar(trainer.config.iterations, trainer.iteration, progress) as bar:
                def advance(record: dict[str, Any]) -> None:
                    bar.update(bar.task_ids[0], advance=1, description=describe(record))

                trainer.run(advance)
        except RewardClientError as exc:
            raise PPOError(
                f"stopped at iteration {trainer.iteration + 1}: the reward server's answer "
                f"cannot be used ({type(exc).__name__}: {exc}). Nothing from that iteration was "
                f"trained on; {out / CHECKPOINT} holds the run after iteration "
                f"{trainer.iteration} and {out / LOG} its log (go on with --resume).") from exc
    return trainer
