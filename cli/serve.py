"""`tokenrm serve`: one process (HTTP and gRPC on one engine), or with --ray a Ray Serve
application of replicas."""

from __future__ import annotations

import argparse
from typing import Any

from tokenrm.cli.paths import checkpoint


def _settings(args: argparse.Namespace) -> Any:
    """Settings from the flags over TOKENRM_* variables; the demo model when none is given."""
    from pydantic import ValidationError

    from tokenrm.server.settings import Settings

    given = {"model": args.model, "host": args.host, "http_port": args.port,
             "grpc_port": args.grpc_port}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:  # one line per bad setting, named as the user sets it
        problems = [(f"TOKENRM_{'_'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "")
                    + e["msg"].removeprefix("Value error, ") for e in exc.errors()]
        raise SystemExit("tokenrm serve: invalid settings: " + "; ".join(problems)) from None
    if settings.model is None:  # the demo model, shipped with the package
        from tokenrm import demo

        settings = settings.model_copy(update={
            "model": demo.checkpoint(), "model_name": settings.model_name or demo.NAME})
    return settings


def _at_least(low: float, kind: type = int) -> Any:
    """An argparse type: a number of `kind` no smaller than `low`, else a one-line error."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below {low:g}")
        return value

    return parse


def ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Serve's deployment options from the flags. Each replica may hold up to
    --max-ongoing requests (its own engine admits or refuses them, 429 with a hint); beyond,
    the proxy queues up to --max-queued per proxy, then refuses with 429 itself."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        "max_ongoing_requests": args.max_ongoing, "max_queued_requests": args.max_queued,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "health_check_period_s": 5}
    if args.autoscale:
        low, _, high = args.autoscale.partition(":")
        if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high)):
            raise SystemExit(f"tokenrm serve: --autoscale {args.autoscale!r}: give MIN:MAX, "
                             "e.g. 1:4")
        options["autoscaling_config"] = {"min_replicas": int(low), "max_replicas": int(high),
                                         "target_ongoing_requests": args.target_ongoing}
    else:
        options["num_replicas"] = args.replicas
    return options


def _serve(args: argparse.Namespace) -> None:
    from tokenrm.server.model import ModelLoadError
    from tokenrm.server.serve import PortInUse

    if args.print_config and not args.ray:
        raise SystemExit("tokenrm serve: --print-config prints a Ray Serve config: add --ray")
    settings = _settings(args)
    try:
        if args.ray and args.print_config:
            from tokenrm.server.ray_deploy import config_file

            print(config_file(settings, ray_options(args)), end="")
        elif args.ray:
            from tokenrm.server.ray_deploy import run as run_ray

            run_ray(settings, ray_options(args), args.ray_address, args.ray_metrics_port)
        else:
            from tokenrm.server.serve import run

            run(settings)
    except (ModelLoadError, PortInUse) as exc:
        raise SystemExit(f"tokenrm serve: {exc}") from None


def add_serve_command(sub: Any) -> None:
    """The `serve` subcommand, onto the parser's subparsers."""
    p = sub.add_parser("serve", help="serve a reward model over HTTP and gRPC (the demo model "
                                     "by default); other settings: TOKENRM_* variables")
    p.add_argument("--model", type=checkpoint,
                   help="checkpoint directory (default: the demo model)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; TOKENRM_HOST)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000; TOKENRM_HTTP_PORT)")
    p.add_argument("--grpc-port", type=int,
                   help="gRPC port, 0 for none (default 50051; TOKENRM_GRPC_PORT)")
    ray = p.add_argument_group("Ray Serve (pip install 'tokenrm[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="serve as a Ray Serve application: replicas, each with the model")
    ray.add_argument("--ray-address", help="join this Ray cluster (default: start a local Ray)")
    ray.add_argument("--ray-metrics-port", type=int,
                     help="a local Ray's metrics port: every replica's metrics, Prometheus text "
                          "(GET /metrics of the app answers for the one replica it reaches)")
    ray.add_argument("--replicas", type=_at_least(1), default=1, help="replicas (fixed)")
    ray.add_argument("--autoscale", metavar="MIN:MAX", help="replicas between MIN and MAX")
    ray.add_argument("--target-ongoing", type=_at_least(0.1, float), default=16,
                     help="autoscaling target of requests in flight per replica")
    ray.add_argument("--replica-cpus", type=_at_least(0, float), default=1, help="CPUs per replica")
    ray.add_argument("--replica-gpus", type=_at_least(0, float), default=0, help="GPUs per replica")
    ray.add_argument("--max-ongoing", type=_at_least(1), default=64,
                     help="requests in flight per replica (its engine batches them)")
    ray.add_argument("--max-queued", type=_at_least(1), default=256,
                     help="requests a proxy queues when every replica is full; beyond: 429")
    ray.add_argument("--print-config", action="store_true",
                     help="print the Serve config file of these flags (for serve deploy, "
                          "KubeRay) and exit")
    p.set_defaults(run=_serve)


def _ray_update(args: argparse.Namespace) -> None:
    from tokenrm.server.ray_deploy import update

    update(args.ray_address, args.model.absolute(), args.model_version)
    print(f"every replica serves {args.model}")


def add_ray_update_command(sub: Any) -> None:
    """The `ray-update` subcommand: a running `tokenrm serve --ray` onto another checkpoint."""
    p = sub.add_parser("ray-update", help="switch a running Ray deployment to another "
                                          "checkpoint, one replica at a time, no failed request")
    p.add_argument("--model", type=checkpoint, required=True,
                   help="checkpoint directory (the replicas' machines must see the same path)")
    p.add_argument("--model-version", help="the version answers report (default: a hash of "
                                           "the checkpoint's config and weight files)")
    p.add_argument("--ray-address", default="auto",
                   help="the Ray cluster (default: the one running on this machine)")
    p.set_defaults(run=_ray_update)
