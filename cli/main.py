"""The `tokenrm` command: parses arguments, imports the heavy parts only for the chosen job."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

DEFAULT_SERVER = "grpc://127.0.0.1:50051"


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
    from tokenrm.training.presets import PRESETS
    from tokenrm.training.train import TrainOptions, train_rm

    options = TrainOptions(seed=args.seed, threads=args.threads, grad_accum=args.grad_accum,
                           base=args.base)
    trained = train_rm(args.data, args.out, PRESETS[args.preset], options)
    print(json.dumps({"checkpoint": str(args.out), **trained.metrics["eval"]}, indent=2))


def _eval_rm(args: argparse.Namespace) -> None:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from tokenrm.training.data import load_pairs
    from tokenrm.training.evaluate import evaluate

    model = AutoModelForTokenClassification.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    max_len = model.config.max_position_embeddings
    print(json.dumps(evaluate(model, tokenizer, load_pairs(args.data), max_len), indent=2))


def _serve(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from tokenrm.server.main import run
    from tokenrm.server.model import ModelLoadError
    from tokenrm.server.settings import Settings

    given = {"model": args.model, "host": args.host, "http_port": args.port,
             "grpc_port": args.grpc_port}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:  # one line per bad setting, named as the user sets it
        problems = [(f"TOKENRM_{'_'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "")
                    + e["msg"].removeprefix("Value error, ") for e in exc.errors()]
        raise SystemExit("tokenrm serve: invalid settings: " + "; ".join(problems)) from None
    try:
        run(settings)
    except ModelLoadError as exc:
        raise SystemExit(f"tokenrm serve: {exc}") from None


def _demo(args: argparse.Namespace) -> None:
    from tokenrm.training.demo import demo_checkpoint

    print(demo_checkpoint(args.cache_dir, args.preset))


def _score(args: argparse.Namespace) -> None:
    from tokenrm.client.score_view import ScoreCliError, read_response, run

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no per-request INFO lines
    try:
        response = args.response if args.response is not None else read_response(
            args.response_file)
        run(args.url, args.prompt, response, top=args.top, api_key=args.api_key,
            raw_json=args.json, timeout=args.timeout)
    except ScoreCliError as exc:
        print(f"tokenrm score: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenrm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write seeded minimal-edit pairs (train/eval JSONL)")
    p.add_argument("--out", type=Path, required=True, help="directory for train.jsonl, eval.jsonl")
    p.add_argument("--n", type=int, default=6000, help="pairs in all; a tenth are held out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_synth)

    p = sub.add_parser("train-rm", help="train a token reward model; writes a HF checkpoint")
    p.add_argument("--data", type=Path, required=True, help="directory with train/eval.jsonl")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--preset", choices=("tiny", "demo"), default="demo")
    p.add_argument("--base", type=Path, help="a local HF checkpoint to start from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.set_defaults(run=_train_rm)

    p = sub.add_parser("eval-rm", help="print a token reward model's metrics as JSON")
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--data", type=Path, required=True, help="a JSONL file of pairs")
    p.set_defaults(run=_eval_rm)

    p = sub.add_parser("serve", help="serve a reward model over HTTP and gRPC (the demo model "
                                     "by default); other settings: TOKENRM_* variables")
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the demo model)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; TOKENRM_HOST)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000; TOKENRM_HTTP_PORT)")
    p.add_argument("--grpc-port", type=int,
                   help="gRPC port, 0 for none (default 50051; TOKENRM_GRPC_PORT)")
    p.set_defaults(run=_serve)

    p = sub.add_parser("demo", help="build (once) and print the path of the demo model")
    p.add_argument("--preset", choices=("tiny", "demo"), default="demo")
    p.add_argument("--cache-dir", type=Path, help="default: the user's cache directory")
    p.set_defaults(run=_demo)

    p = sub.add_parser("score", help="score one response on a running server; show its tokens "
                                     "coloured by reward")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--prompt", required=True, help="the prompt (context, not scored)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--response", help="the response text to score")
    given.add_argument("--response-file", metavar="PATH",
                       help="read the response from a UTF-8 file, verbatim; - for stdin")
    p.add_argument("--top", type=int, default=5, metavar="K", help="most negative tokens to list")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer <key>'")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    p.add_argument("--json", action="store_true", help="print the server's raw JSON instead")
    p.set_defaults(run=_score)

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
