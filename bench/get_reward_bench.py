"""OpenRLHF's way of calling a reward server, measured: every rollout sample its own POST
/get_reward with one query, from 32 concurrent callers, against `tokenrm serve` (the engine
batches across requests) and against OpenRLHF's example server pattern on the same model
(bench/naive_server.py: the forward inside the handler). Writes bench/results/get_reward.json
and .md (printed too).

    python bench/get_reward_bench.py [--model DIR] [--seconds 15] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import re
from contextlib import ExitStack
from typing import Any

import uvloop
from load import Body, metrics_text, run_load
from serve_bench import load_arguments, resolve_model, start_servers

from tokenrm.training import synth

SAMPLES = 256  # distinct queries; clients cycle through them


def bodies(n: int, seed: int) -> list[Body]:
    """One query per request, as OpenRLHF sends them: the prompt and the response (with EOS
    text) decoded together, the prompt beside it."""
    out = []
    for i, pair in enumerate(synth.generate(seed, n)):
        response = (pair.rejected if i % 2 else pair.edited) + "</s>"
        data = {"query": [pair.prompt + response], "prompts": [pair.prompt], "labels": [None]}
        out.append(Body(json.dumps(data).encode(), b"", tokens=1, padded=1,  # counted: requests
                        path="/get_reward"))
    return out


def histogram_means(text: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram."""
    values = dict(re.findall(rf"^{name}_(sum|count) ([0-9.eE+-]+)$", text, flags=re.M))
    return float(values.get("sum", 0)), float(values.get("count", 0))


async def measure(targets: dict[str, Any], work: list[Body], args: argparse.Namespace
                  ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, target in targets.items():
        before = histogram_means(await metrics_text(target.url), "tokenrm_batch_size")
        out[name] = await run_load(target, "http", work, args.concurrency, args.warmup,
                                   args.seconds, max_settle=30)
        after = histogram_means(await metrics_text(target.url), "tokenrm_batch_size")
        forwards = after[1] - before[1]
        out[name]["rows_per_forward"] = (after[0] - before[0]) / forwards if forwards else None
        print(f"[{name}] {out[name]['requests_per_s']:.1f} req/s, p50 "
              f"{out[name]['p50_ms']:.1f} ms", flush=True)
    return out


def render(result: dict[str, Any]) -> str:
    s, n = result["server"], result["naive"]
    ratio = s["requests_per_s"] / n["requests_per_s"]
    return "\n".join([
        "# POST /get_reward: OpenRLHF's calls, one query each",
        "",
        f"model `{result['model']}`; {result['concurrency']} concurrent callers, one query "
        f"per request (synthetic prompts and responses with `</s>`), {result['seconds']:g} s "
        "windows after a warm-up; the load generator shares the cores with the server.",
        "",
        "| server | req/s | p50 / p99 ms | rows per forward | errors |",
        "|---|---:|---:|---:|---:|",
        *(f"| {label} | {r['requests_per_s']:,.1f} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | "
          f"{r['rows_per_forward'] or 1:.1f} | {r['errors']} |"
          for label, r in (("tokenrm serve", s), ("OpenRLHF serve_rm pattern", n))),
        "",
        f"- tokenrm / serve_rm pattern: **{ratio:.2f}x** requests/s (floor 2x: "
        f"{'met' if ratio >= 2 else '**not met**'}); rows per forward from tokenrm's /metrics "
        "(tokenrm_batch_size); the serve_rm pattern runs one forward per request.",
        ""])


def main() -> None:
    args = load_arguments(__doc__, warmup=2.0)
    path = resolve_model(args.model)
    with ExitStack() as stack:
        targets = start_servers(stack, path)
        loads = uvloop.run(measure(targets, bodies(SAMPLES, 41), args))
    result = {"model": str(path), "concurrency": args.concurrency, "seconds": args.seconds,
              **loads}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "get_reward.json").write_text(json.dumps(result, indent=2) + "\n")
    report = render(result)
    (args.out / "get_reward.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
