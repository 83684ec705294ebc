"""The `tokenrm` command: parses arguments, imports the heavy parts only for the chosen job."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from tokenrm.cli.extras import advice
from tokenrm.cli.paths import OneLineParser, checkpoint, existing_file, out_dir, pairs_dir
from tokenrm.cli.ppo import add_ppo_commands
from tokenrm.cli.score import add_score_command
from tokenrm.cli.serve import add_ray_update_command, add_serve_command


def _synth(args: argparse.Namespace) -> None:
    from tokenrm.training import synth
    from tokenrm.training.data import write_pairs

    args.out.mkdir(parents=True, exist_ok=True)
    n_eval = max(1, args.n // 10)
    n_train = write_pairs(args.out / "train.jsonl", synth.generate(args.seed, args.n - n_eval))
    # A separate seed: held-out pairs come from a world of other people.
    n_held = write_pairs(args.out / "eval.jsonl", synth.generate(args.seed + 10_000, n_eval))
    print(f"wrote {n_train} training and {n_held} held-out pairs to {args.out}")


def _train_rm(args: argparse.Namespace) -> None:
    from tokenrm.training.pairwise import train_pairwise_rm
    from tokenrm.training.presets import PRESETS
    from tokenrm.training.train import TrainOptions, train_rm

    if args.objective == "pairwise" and args.grad_accum != 1:
        raise SystemExit("tokenrm train-rm: --grad-accum is for --objective token")
    options = TrainOptions(seed=args.seed, threads=args.threads, grad_accum=args.grad_accum,
                           base=args.base)
    train = train_rm if args.objective == "token" else train_pairwise_rm
    trained = train(args.data, args.out, PRESETS[args.preset], options)
    print(json.dumps({"checkpoint": str(args.out), **trained.metrics["eval"]}, indent=2))


def _eval_rm(args: argparse.Namespace) -> None:
    from tokenrm.server.model import ModelLoadError, RewardModel
    from tokenrm.training.data import load_pairs
    from tokenrm.training.evaluate import evaluate

    pairs = load_pairs(args.data)
    try:  # any checkpoint the server serves: 1, 2 or 3 labels, token or sequence heads
        model = RewardModel.load(args.model, trace=False)
    except ModelLoadError as exc:
        raise SystemExit(f"tokenrm eval-rm: {exc}") from None
    print(json.dumps(evaluate(model.score_texts, pairs, model.info.kind == "token"), indent=2))


def _demo(args: argparse.Namespace) -> None:
    from tokenrm.training.demo import demo_checkpoint, rebuild

    if args.rebuild and args.preset != "demo":
        raise SystemExit("tokenrm demo: --rebuild is for the shipped demo preset; the tiny "
                         "preset is built on first use")
    print(rebuild() if args.rebuild else demo_checkpoint(args.cache_dir, args.preset))


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tokenrm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write seeded minimal-edit pairs (train/eval JSONL)")
    p.add_argument("--out", type=out_dir, required=True,
                   help="directory for train.jsonl, eval.jsonl")
    p.add_argument("--n", type=int, default=6000, help="pairs in all; a tenth are held out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_synth)

    p = sub.add_parser("train-rm", help="train a token (or sequence-level) reward model; writes "
                                        "a HF checkpoint")
    p.add_argument("--data", type=pairs_dir, required=True,
                   help="directory with train/eval.jsonl")
    p.add_argument("--out", type=out_dir, required=True, help="checkpoint directory to write")
    p.add_argument("--preset", choices=("tiny", "demo"), default="demo")
    p.add_argument("--objective", choices=("token", "pairwise"), default="token",
                   help="token (default): a reward per token from the edits' labels; pairwise: "
                        "one score per response, Bradley-Terry on the pairs (standard RLHF's "
                        "reward model)")
    p.add_argument("--base", type=checkpoint, help="a local HF checkpoint to start from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.set_defaults(run=_train_rm)

    p = sub.add_parser("eval-rm", help="print a token reward model's metrics as JSON")
    p.add_argument("--model", type=checkpoint, required=True, help="checkpoint directory")
    p.add_argument("--data", type=existing_file, required=True, help="a JSONL file of pairs")
    p.set_defaults(run=_eval_rm)

    add_serve_command(sub)
    add_ray_update_command(sub)

    p = sub.add_parser("demo", help="print the path of the demo model (shipped; the tiny "
                                    "preset's is built once)")
    p.add_argument("--preset", choices=("tiny", "demo"), default="demo")
    p.add_argument("--rebuild", action="store_true",
                   help="train the shipped demo model again with the recipe (minutes), into "
                        "the package's demo/demo-token-rm")
    p.add_argument("--cache-dir", type=out_dir, help="default: the user's cache directory")
    p.set_defaults(run=_demo)

    add_score_command(sub)
    add_ppo_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from tokenrm.training.data import DataError

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (DataError, FileNotFoundError) as exc:
        print(f"tokenrm {args.command}: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # a command of an extra that is not installed
        said = advice(exc, args.command)
        if said is None:
            raise
        print(f"tokenrm {args.command}: {said}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
