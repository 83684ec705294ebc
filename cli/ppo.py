"""`tokenrm ppo` and `tokenrm experiment`: their arguments and how they start a run.

Their defaults are those of the dataclasses the flags fill (PPOConfig, Sampling, Connection,
Experiment): a flag left out stays None here and the field keeps its default. (Reading the
defaults while building the parser would import torch into every `tokenrm` command.)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from tokenrm.cli.extras import require
from tokenrm.cli.paths import checkpoint, existing_file, out_dir

DEFAULT_SERVER = "grpc://127.0.0.1:50051"
# Flag (argparse dest) -> the dataclass field it sets.
CONFIG_FLAGS = {"mode": "mode", "iterations": "iterations", "prompts": "prompts_per_iteration",
                "samples": "samples_per_prompt", "generation_batch": "generation_batch",
                "beta": "beta", "kl_target": "kl_target", "kl_horizon": "kl_horizon",
                "kl_budget": "kl_budget", "lr": "lr", "epochs": "epochs",
                "minibatch": "minibatch", "seed": "seed", "save_every": "save_every"}
SAMPLING_FLAGS = {"temperature": "temperature", "top_p": "top_p",
                  "max_new_tokens": "max_new_tokens"}
CONNECTION_FLAGS = {"send": "send", "timeout": "timeout_s"}
EXPERIMENT_FLAGS = {"seeds": "seeds", "arms": "arms", "eval_every": "eval_every",
                    "eval_prompts": "eval_prompts"}
OFF_AT_ZERO = ("kl_target", "kl_budget")  # 0 on the command line: the feature is off (None)


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """The fields set by the flags the user gave; the others keep their dataclass defaults."""
    values = {field: getattr(args, dest, None) for dest, field in flags.items()}
    return {field: value for field, value in values.items() if value is not None}


def _ppo_config(args: argparse.Namespace) -> Any:
    from tokenrm.training.ppo.rollout import Sampling
    from tokenrm.training.ppo.trainer import PPOConfig

    given: dict[str, Any] = {k: None if k in OFF_AT_ZERO and v == 0 else v
                             for k, v in _given(args, CONFIG_FLAGS).items()}
    if getattr(args, "no_score_norm", False):
        given["score_norm"] = False
    return PPOConfig(sampling=Sampling(**_given(args, SAMPLING_FLAGS)), **given)


def _connection(args: argparse.Namespace, urls: list[str] | None = None) -> Any:
    from tokenrm.training.ppo.run import Connection

    return Connection(urls or args.server or [DEFAULT_SERVER], args.api_key,
                      **_given(args, CONNECTION_FLAGS))


def _task(args: argparse.Namespace, config: Any) -> tuple[Any, Any]:
    """--prompt-file's prompts with no judge; without it, the synthetic task and its oracle (a
    resumed run: what its config.json records)."""
    from tokenrm.training.ppo.prompts import FilePrompts
    from tokenrm.training.ppo.run import synthetic_task

    if args.prompt_file is not None:
        return FilePrompts.load(args.prompt_file, config.prompt_seed), None
    return (None, None) if args.resume else synthetic_task(config)


def _ppo(args: argparse.Namespace) -> None:
    import torch

    from tokenrm.training.demo import demo_policy
    from tokenrm.training.ppo.run import PPOError, run_ppo

    if args.threads:
        torch.set_num_threads(args.threads)
    config = _ppo_config(args)
    prompts, judge = _task(args, config)  # a bad --prompt-file stops before any other work
    policy = args.policy or (None if args.resume else demo_policy(args.policy_recipe))
    try:
        trainer = run_ppo(args.out, config, _connection(args), policy, args.resume,
                          progress=not args.no_progress, prompts=prompts, judge=judge)
    except PPOError as exc:
        print(f"tokenrm ppo: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{trainer.iteration} iterations; log {args.out / 'log.jsonl'}, "
          f"checkpoint {args.out / 'checkpoint'}")


def _experiment(args: argparse.Namespace) -> None:
    from contextlib import ExitStack

    import torch

    from tokenrm.training.demo import Objective, demo_checkpoint, demo_policy
    from tokenrm.training.ppo.experiment import ARMS, Experiment, run_experiment

    require("matplotlib")  # the report's plot, drawn after the runs: checked before them
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = args.policy or demo_policy(args.policy_recipe)
    preset = "tiny" if args.policy_recipe == "tiny" else "demo"
    exp = Experiment(_ppo_config(args), **_given(args, EXPERIMENT_FLAGS))
    with ExitStack() as stack:
        urls = {}
        rms: tuple[tuple[Objective, list[str] | None], ...] = (
            ("token", args.server), ("pairwise", args.seq_server))
        for rm, given in rms:
            if rm not in {ARMS[a].rm for a in exp.arms}:
                continue
            if given:
                urls[rm] = given
                continue
            from tokenrm.server.launcher import serve  # a local demo server, for this run only

            running = stack.enter_context(serve(demo_checkpoint(preset_name=preset,
                                                                objective=rm)))
            urls[rm] = [f"grpc://{running.grpc_target}"]
        run_experiment(args.out, exp, {rm: _connection(args, u) for rm, u in urls.items()},
                       policy)
    print((args.out / "fine-vs-seq.md").read_text())


def _ppo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=out_dir, required=True, help="run directory (log, checkpoints)")
    p.add_argument("--server", action="append", metavar="URL",
                   help=f"reward server, grpc://host:port or http://host:port (default "
                        f"{DEFAULT_SERVER}); repeat for several")
    p.add_argument("--api-key", default=os.environ.get("TOKENRM_API_KEY"),
                   help="the server's API key (default: TOKENRM_API_KEY, which keeps it out of "
                        "the process list)")
    p.add_argument("--send", choices=("auto", "ids", "text"),
                   help="token ids (the policy shares the server's tokenizer) or text with "
                        "spans; auto (default): ids when the tokenizers' fingerprints match")
    p.add_argument("--timeout", type=float,
                   help="seconds one scoring call may take, retries included")
    p.add_argument("--policy", type=checkpoint,
                   help="SFT policy directory (default: the demo policy, built once)")
    p.add_argument("--policy-recipe", choices=("tiny", "demo"), default="demo",
                   help="which demo policy to build when --policy is not given")
    p.add_argument("--iterations", type=int)
    p.add_argument("--prompts", type=int, help="prompts per iteration")
    p.add_argument("--samples", type=int, help="samples per prompt")
    p.add_argument("--generation-batch", type=int,
                   help="rollouts generated at once (each batch is scored while the next "
                        "is generated)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--beta", type=float, help="KL coefficient (start value)")
    p.add_argument("--kl-target", type=float,
                   help="adapt beta towards this KL per response (default 6; 0: beta fixed)")
    p.add_argument("--kl-horizon", type=int,
                   help="rollouts over which beta may change by e^(+-0.2) (default 320)")
    p.add_argument("--kl-budget", type=float,
                   help="a policy past this KL per response is not kept: the run goes back to "
                        "its last policy within it and stops (default 15; 0: no budget)")
    p.add_argument("--no-score-norm", action="store_true",
                   help="--mode seq: use the scores as they come (default: normalised by their "
                        "running mean and std)")
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int, help="PPO epochs per iteration")
    p.add_argument("--minibatch", type=int, help="rollouts per optimiser step")
    p.add_argument("--seed", type=int)
    p.add_argument("--save-every", type=int, help="iterations between checkpoints")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def add_ppo_commands(sub: Any) -> None:
    """The `ppo` and `experiment` subcommands, onto the parser's subparsers."""
    p = sub.add_parser("ppo", help="fine-grained PPO of a policy against a running server")
    _ppo_arguments(p)
    p.add_argument("--prompt-file", type=existing_file, metavar="FILE.jsonl",
                   help='train on your own prompts: one {"prompt": "..."} object per line '
                        "(default: the synthetic task's prompts, judged by its oracle)")
    p.add_argument("--mode", choices=("fine", "seq"),
                   help="fine (default): the RM's reward on every token; seq: its total on "
                        "the last")
    p.add_argument("--resume", action="store_true", help="go on with the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_ppo)

    p = sub.add_parser("experiment", help="fine-grained vs sequence-level PPO over seeds; "
                                          "starts local demo servers unless --server and "
                                          "--seq-server are given")
    p.add_argument("name", choices=("fine-vs-seq",))
    _ppo_arguments(p)
    p.add_argument("--seq-server", action="append", metavar="URL",
                   help="server of the sequence-level (Bradley-Terry) reward model (default: a "
                        "local one on the demo's)")
    p.add_argument("--arms", nargs="+", choices=("fine", "seq", "seq-total"),
                   help="fine: the token RM per token; seq: the Bradley-Terry RM's score on the "
                        "last token; seq-total: the token RM's total there (default: all)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--eval-every", type=int, help="iterations between evaluations")
    p.add_argument("--eval-prompts", type=int, help="held-out prompts judged")
    p.set_defaults(run=_experiment)
