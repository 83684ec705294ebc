"""`tokenrm ppo` and `tokenrm experiment`: their arguments and how they start a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal

DEFAULT_SERVER = "grpc://127.0.0.1:50051"


def _ppo_config(args: argparse.Namespace, mode: Literal["fine", "seq"] = "fine") -> Any:
    from tokenrm.training.ppo.rollout import Sampling
    from tokenrm.training.ppo.trainer import PPOConfig

    return PPOConfig(
        mode=mode, iterations=args.iterations, prompts_per_iteration=args.prompts,
        samples_per_prompt=args.samples, generation_batch=args.generation_batch,
        sampling=Sampling(args.temperature, args.top_p, args.max_new_tokens), beta=args.beta,
        kl_target=args.kl_target, lr=args.lr, epochs=args.epochs, minibatch=args.minibatch,
        seed=args.seed, save_every=args.save_every)


def _connection(args: argparse.Namespace) -> Any:
    from tokenrm.training.ppo.run import Connection

    return Connection(args.server or [DEFAULT_SERVER], args.api_key, args.send, args.timeout)


def _ppo(args: argparse.Namespace) -> None:
    import torch

    from tokenrm.training.ppo.run import PPOError, demo_policy, run_ppo

    if args.threads:
        torch.set_num_threads(args.threads)
    policy = args.policy or (None if args.resume else demo_policy(args.policy_recipe))
    try:
        trainer = run_ppo(args.out, _ppo_config(args, args.mode), _connection(args), policy,
                          args.resume, progress=not args.no_progress)
    except PPOError as exc:
        print(f"tokenrm ppo: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{trainer.iteration} iterations; log {args.out / 'log.jsonl'}, "
          f"checkpoint {args.out / 'checkpoint'}")


def _experiment(args: argparse.Namespace) -> None:
    from contextlib import ExitStack

    import torch

    from tokenrm.training.ppo.experiment import Experiment, run_experiment
    from tokenrm.training.ppo.run import demo_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    policy = args.policy or demo_policy(args.policy_recipe)
    with ExitStack() as stack:
        if not args.server:  # a local server on the demo model, for this experiment only
            from tokenrm.server.process import serve
            from tokenrm.training.demo import demo_checkpoint

            running = stack.enter_context(serve(demo_checkpoint(
                preset_name="tiny" if args.policy_recipe == "tiny" else "demo")))
            args.server = [f"grpc://{running.grpc_target}"]
        exp = Experiment(_ppo_config(args), seeds=tuple(args.seeds), eval_every=args.eval_every,
                         eval_prompts=args.eval_prompts)
        run_experiment(args.out, exp, _connection(args), policy)
    print((args.out / "fine-vs-seq.md").read_text())


def _ppo_arguments(p: argparse.ArgumentParser, iterations: int) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory (log, checkpoints)")
    p.add_argument("--server", action="append", metavar="URL",
                   help=f"reward server, grpc://host:port or http://host:port (default "
                        f"{DEFAULT_SERVER}); repeat for several")
    p.add_argument("--api-key", help="the server's API key")
    p.add_argument("--send", choices=("auto", "ids", "text"), default="auto",
                   help="token ids (the policy shares the server's tokenizer) or text with "
                        "spans; auto: ids when the tokenizers' fingerprints match")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one scoring call may take, retries included")
    p.add_argument("--policy", type=Path,
                   help="SFT policy directory (default: the demo policy, built once)")
    p.add_argument("--policy-recipe", choices=("tiny", "demo"), default="demo",
                   help="which demo policy to build when --policy is not given")
    p.add_argument("--iterations", type=int, default=iterations)
    p.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--generation-batch", type=int, default=32,
                   help="rollouts generated at once (each batch is scored while the next "
                        "is generated)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (start value)")
    p.add_argument("--kl-target", type=float,
                   help="adapt beta towards this KL per response (default: beta fixed)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs per iteration")
    p.add_argument("--minibatch", type=int, default=16, help="rollouts per optimiser step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=10, help="iterations between checkpoints")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def add_ppo_commands(sub: Any) -> None:
    """The `ppo` and `experiment` subcommands, onto the parser's subparsers."""
    p = sub.add_parser("ppo", help="fine-grained PPO of a policy against a running server")
    _ppo_arguments(p, iterations=60)
    p.add_argument("--mode", choices=("fine", "seq"), default="fine",
                   help="fine: the RM's reward on every token; seq: its total on the last")
    p.add_argument("--resume", action="store_true", help="go on with the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_ppo)

    p = sub.add_parser("experiment", help="fine-grained vs sequence-level PPO over seeds; "
                                          "starts a local demo server unless --server is given")
    p.add_argument("name", choices=("fine-vs-seq",))
    _ppo_arguments(p, iterations=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=10, help="iterations between evaluations")
    p.add_argument("--eval-prompts", type=int, default=300, help="held-out prompts judged")
    p.set_defaults(run=_experiment)
