"""Serving benchmark: `tokenrm serve` over HTTP and gRPC beside the raw batched forward and a
naive server, in one run.

Per mix of response lengths it measures real tokens/s of (1) the in-process forward batched the
way the engine batches, (2) the tokenrm server over HTTP, gRPC unary and gRPC streaming, and
(3) bench/naive_server.py, under the same closed-loop load of concurrent clients; then the
transports' own cost (requests/s with one-token responses), latency at concurrency 1 and a
ceiling from fp32 matmul speed. Writes bench/results/serve.json and .md (printed too).

    python bench/serve_bench.py [--model DIR] [--seconds 15] [--items-per-request 16] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvloop
from load import TRANSPORTS, Body, Row, Target, run_load, sequential_latency, to_bodies

from tokenrm.server.batching import padded_tokens, pick_batch
from tokenrm.server.calibration import overhead_tokens
from tokenrm.server.launcher import free_port, launch, stop
from tokenrm.server.live import available_cores, load_model
from tokenrm.server.model import RewardModel
from tokenrm.server.settings import Settings

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAIVE_SERVER = HERE / "naive_server.py"
MIXES = {"8-32": (8, 32), "32-128": (32, 128), "16-512": (16, 512)}
LATENCY_MIX = "8-32"
LOADS = (("server", "server", "http"), ("grpc", "server", "grpc"),  # (name, server, transport)
         ("grpc_stream", "server", "grpc-stream"), ("naive", "naive", "http"))
PROMPT_LEN = 16
FIRST_ID = 3            # ids below are special tokens (pad, bos, eos)
POOL_REQUESTS = 64      # distinct request bodies per mix; clients cycle through them
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Options:
    seconds: float
    warmup: float
    concurrency: int
    items_per_request: int
    seed: int
    latency_requests: int
    matmul_seconds: float
    max_settle: float         # longest extra warm-up waiting for every client's first response
    quick: bool


@dataclass(frozen=True)
class Mix:
    name: str
    lo: int
    hi: int
    note: str | None = None


# ---------------------------------------------------------------- workload


def plan_mixes(max_len: int) -> list[Mix]:
    """The length mixes, the upper bound capped so that prompt + response fits the model."""
    mixes = []
    for name, (lo, hi) in MIXES.items():
        cap = max_len - PROMPT_LEN
        if hi <= cap:
            mixes.append(Mix(name, lo, hi))
        else:
            note = f"mix {name}: response length capped at {cap} (model max_len {max_len})"
            mixes.append(Mix(name, min(lo, cap), cap, note))
    return mixes


def make_rows(mix: Mix, vocab_size: int, n: int, seed: int) -> list[Row]:
    """`n` token items: a random prompt of PROMPT_LEN ids and a response of uniform length."""
    rng = random.Random(f"{seed}-{mix.name}")
    rows = []
    for _ in range(n):
        length = rng.randint(mix.lo, mix.hi)
        ids = [rng.randrange(FIRST_ID, vocab_size) for _ in range(PROMPT_LEN + length)]
        rows.append((ids, length))
    return rows


# ---------------------------------------------------------------- server processes


@contextmanager
def running(name: str, command: list[str], port: int, ready_path: str,
            grpc_port: int | None = None, env: dict[str, str] | None = None
            ) -> Iterator[Target]:
    """Start a server listening on 127.0.0.1:`port`, wait until `ready_path` answers 200,
    yield where it listens, stop it."""
    url = f"http://127.0.0.1:{port}"
    proc = launch(command, url + ready_path, name=name, timeout_s=READY_TIMEOUT_S, env=env)
    try:
        yield Target(url, None if grpc_port is None else f"127.0.0.1:{grpc_port}", proc.pid)
    finally:
        stop(proc)


def start_servers(stack: ExitStack, model: Path) -> dict[str, Target]:
    """`tokenrm serve` (HTTP and gRPC) and the naive server, stopped when `stack` closes."""
    port, grpc_port, naive_port = free_port(), free_port(), free_port()
    server = [sys.executable, "-m", "tokenrm.cli.main", "serve", "--model", str(model),
              "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)]
    naive = [sys.executable, str(NAIVE_SERVER), "--model", str(model), "--port", str(naive_port)]
    return {"server": stack.enter_context(running("tokenrm serve", server, port, "/readyz",
                                                  grpc_port)),
            "naive": stack.enter_context(running("naive server", naive, naive_port, "/healthz"))}


def post_rewards(url: str, body: Body) -> list[np.ndarray]:
    response = httpx.post(f"{url}/score", content=body.json, timeout=60,
                          headers={"content-type": "application/json"})
    response.raise_for_status()
    return [np.asarray(r["rewards"], dtype=np.float32) for r in response.json()["results"]]


# ---------------------------------------------------------------- in-process


def raw_throughput(model: RewardModel, rows: Sequence[Row], settings: Settings,
                   overhead_tokens: float, opts: Options) -> dict[str, Any]:
    """Real tokens/s of model.score over batches chosen by pick_batch from a queue as deep as
    the HTTP load keeps the server's (concurrency x items per request), refilled in order, on
    as many threads as the server runs forward passes at once."""
    feed = itertools.cycle(rows)
    waiting = [next(feed) for _ in range(opts.concurrency * opts.items_per_request)]
    lock = threading.Lock()

    def step() -> list[Row]:
        with lock:
            chosen = set(pick_batch([len(ids) for ids, _ in waiting], settings.max_batch_tokens,
                                    settings.max_batch_size, overhead_tokens))
            batch = [r for i, r in enumerate(waiting) if i in chosen]
            waiting[:] = [r for i, r in enumerate(waiting) if i not in chosen]
            waiting.extend(next(feed) for _ in chosen)
        model.score(batch)
        return batch

    workers, _threads = settings.parallelism(available_cores())
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(lambda _: _repeat_for(opts.warmup, step), range(workers)):
            pass
        started = time.perf_counter()
        runs = list(pool.map(lambda _: _repeat_for(opts.seconds, step), range(workers)))
        elapsed = time.perf_counter() - started
    batches = [b for done, _ in runs for b in done]
    tokens = sum(len(ids) for b in batches for ids, _ in b)
    padded = sum(padded_tokens([len(ids) for ids, _ in b]) for b in batches)
    return {"tokens_per_s": tokens / elapsed, "padding_ratio": padded / tokens,
            "batches": len(batches), "mean_batch_rows": sum(map(len, batches)) / len(batches),
            "workers": workers}


def _repeat_for(seconds: float, fn: Callable[[], Any]) -> tuple[list[Any], float]:
    """Call `fn` until `seconds` have passed (at least once); its results and the time taken."""
    results: list[Any] = []
    started = time.perf_counter()
    while not results or time.perf_counter() - started < seconds:
        results.append(fn())
    return results, time.perf_counter() - started


def forward_p50_ms(model: RewardModel, rows: Sequence[Row], n: int) -> float:
    """p50 of one in-process forward of one item."""
    times = []
    for i in range(-5, n):
        started = time.perf_counter()
        model.score([rows[i % len(rows)]])
        if i >= 0:
            times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50) * 1000)


def matmul_gflops(seconds: float, size: int = 2048) -> float:
    """fp32 GFLOP/s of torch.matmul on size x size matrices, timed after a warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        torch.matmul(a, b)
    calls, elapsed = _repeat_for(seconds, lambda: torch.matmul(a, b))
    return 2 * size**3 * len(calls) / elapsed / 1e9


# ---------------------------------------------------------------- one run


def load_arguments(doc: str, warmup: float) -> argparse.Namespace:
    """The flags of a benchmark that loads servers with concurrent clients."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the demo model)")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=warmup)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def resolve_model(path: Path | None) -> Path:
    if path is not None:
        return path
    from tokenrm.training.demo import demo_checkpoint

    return demo_checkpoint()


def load(target: Target, transport: str, bodies: Sequence[Body], opts: Options
         ) -> dict[str, Any]:
    return uvloop.run(run_load(target, transport, bodies, opts.concurrency, opts.warmup,
                               opts.seconds, opts.max_settle))


def measure_mix(mix: Mix, vocab_size: int, model: RewardModel, targets: dict[str, Target],
                settings: Settings, overhead_tokens: float, opts: Options) -> dict[str, Any]:
    rows = make_rows(mix, vocab_size, POOL_REQUESTS * opts.items_per_request, opts.seed)
    bodies = to_bodies(rows, opts.items_per_request)
    print(f"[{mix.name}] raw ...", flush=True)
    result: dict[str, Any] = {"range": [mix.lo, mix.hi], "note": mix.note,
                              "raw": raw_throughput(model, rows, settings, overhead_tokens,
                                                    opts)}
    for name, server, transport in LOADS:
        print(f"[{mix.name}] {name} ...", flush=True)
        result[name] = load(targets[server], transport, bodies, opts)
    return result


def measure_transports(vocab_size: int, target: Target, opts: Options) -> dict[str, Any]:
    """Requests/s of single-item requests with one-token responses: what each transport costs
    when the model costs almost nothing."""
    rows = make_rows(Mix("1", 1, 1), vocab_size, POOL_REQUESTS, opts.seed + 3)
    bodies = to_bodies(rows, 1)
    result = {}
    for transport in TRANSPORTS:
        print(f"[transport] {transport} ...", flush=True)
        result[transport] = load(target, transport, bodies, opts)
    http, unary, stream = (result[t]["requests_per_s"] for t in TRANSPORTS)
    cost = {t: result[t]["server_cpu_ms_per_request"] for t in TRANSPORTS}
    return {**result, "grpc_over_http": unary / http, "stream_over_unary": stream / unary,
            "server_cpu_ms_per_request": cost,
            "floors": {"grpc_ge_1.2_http": unary >= 1.2 * http, "stream_ge_unary": stream >= unary}}


def measure_latency(mix: Mix, vocab_size: int, model: RewardModel, url: str,
                    opts: Options) -> dict[str, Any]:
    rows = make_rows(mix, vocab_size, opts.latency_requests, opts.seed + 1)
    print(f"[latency] {opts.latency_requests} sequential single-item requests ...", flush=True)
    p50 = uvloop.run(sequential_latency(url, to_bodies(rows, 1), opts.latency_requests))
    forward = forward_p50_ms(model, rows, opts.latency_requests)
    floor = 1.3 * forward + 5.0
    return {"mix": mix.name, "requests": opts.latency_requests, "p50_ms": p50,
            "forward_p50_ms": forward, "floor_ms": floor, "met": p50 <= floor}


def check_agreement(mix: Mix, vocab_size: int, model: RewardModel, targets: dict[str, Target],
                    opts: Options) -> float:
    """Max |reward difference| between each server and the in-process forward on one request."""
    rows = make_rows(mix, vocab_size, opts.items_per_request, opts.seed + 2)
    expected = model.score(rows)
    worst = 0.0
    for target in targets.values():
        got = post_rewards(target.url, to_bodies(rows, len(rows))[0])
        worst = max(worst, *(float(np.abs(g - e).max()) for g, e in zip(got, expected,
                                                                         strict=True)))
    return worst


def add_ratios(mixes: dict[str, dict[str, Any]], ceiling_tok_s: float) -> None:
    """server/raw, server/naive, the share of the ceiling and the floors, per mix."""
    for name, m in mixes.items():
        server, raw, naive = (m[k]["tokens_per_s"] for k in ("server", "raw", "naive"))
        naive_factor = 1.5 if name == LATENCY_MIX else 1.0
        padding = m["server"]["padding_ratio"]
        m["server_over_raw"] = server / raw if raw else None
        m["server_over_naive"] = server / naive if naive else None
        m["ceiling_fraction"] = server / ceiling_tok_s
        m["grpc_over_http"] = m["grpc"]["tokens_per_s"] / server
        m["stream_over_http"] = m["grpc_stream"]["tokens_per_s"] / server
        m["floors"] = {"server_ge_0.8_raw": server >= 0.8 * raw,
                       f"server_ge_{naive_factor:g}_naive": server >= naive_factor * naive,
                       "padding_le_1.2": padding is not None and padding <= 1.2}
        m["grpc_floors"] = {"grpc_ge_0.95_http": m["grpc_over_http"] >= 0.95,
                            "stream_ge_0.95_http": m["stream_over_http"] >= 0.95}


def run(args: argparse.Namespace, opts: Options) -> dict[str, Any]:
    path = resolve_model(args.model)
    settings = Settings(model=path)
    model = load_model(settings)
    with ExitStack() as stack:
        print("starting the servers ...", flush=True)
        targets = start_servers(stack, path)
        vocab_size, max_len = served_limits(targets["server"].url)
        mixes = plan_mixes(max_len)
        agreement = check_agreement(mixes[-1], vocab_size, model, targets, opts)
        overhead = settings.batch_overhead_tokens
        if overhead is None:  # measured as the server measures it at start-up
            overhead = overhead_tokens(model)
        per_mix = {m.name: measure_mix(m, vocab_size, model, targets, settings, overhead, opts)
                   for m in mixes}
        transports = measure_transports(vocab_size, targets["server"], opts)
        latency_mix = next(m for m in mixes if m.name == LATENCY_MIX)
        latency = measure_latency(latency_mix, vocab_size, model, targets["server"].url, opts)
    workers, threads = settings.parallelism(available_cores())
    print("[ceiling] matmul ...", flush=True)
    ceiling = measure_ceiling(model, opts)
    add_ratios(per_mix, ceiling["tokens_per_s"])
    return {"config": {**asdict(opts), "model": str(path), "max_len": max_len,
                       "vocab_size": vocab_size, "prompt_len": PROMPT_LEN,
                       "max_batch_tokens": settings.max_batch_tokens,
                       "max_batch_size": settings.max_batch_size,
                       "overhead_tokens": overhead, "traced": model.info.traced,
                       "workers": workers, "torch_threads": threads, "cpus": available_cores()},
            "notes": [m.note for m in mixes if m.note], "agreement_max_abs_diff": agreement,
            "mixes": per_mix, "transports": transports, "latency": latency, "ceiling": ceiling}


def served_limits(url: str) -> tuple[int, int]:
    """The vocabulary size and the prompt + response length limit, from GET /v1/model."""
    info = httpx.get(f"{url}/v1/model", timeout=10).raise_for_status().json()
    return int(info["vocab_size"]), int(info["max_len"])


def measure_ceiling(model: RewardModel, opts: Options) -> dict[str, float]:
    """Tokens/s the hardware allows at 2 FLOPs per parameter per token, at matmul speed."""
    params = sum(p.numel() for p in model.model.parameters())
    torch.set_num_threads(available_cores())  # the hardware's speed, whatever the server uses
    gflops = matmul_gflops(opts.matmul_seconds)
    return {"matmul_gflops": gflops, "params": params,
            "tokens_per_s": gflops * 1e9 / (2 * params)}


# ---------------------------------------------------------------- report


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def render(result: dict[str, Any]) -> str:
    """The markdown report: the setup, the two tables and the latency and ceiling lines."""
    lines = [*_setup(result), "", *_main_table(result["mixes"]), "",
             *_detail_table(result["mixes"]), "", *_grpc_table(result["mixes"]), "",
             *_footer(result)]
    return "\n".join(lines) + "\n"


def _setup(result: dict[str, Any]) -> list[str]:
    c = result["config"]
    return [
        "# tokenrm serving benchmark" + (" (quick)" if c["quick"] else ""), "",
        f"model `{c['model']}` ({result['ceiling']['params']:,} params, max_len {c['max_len']}, "
        f"vocab {c['vocab_size']}); items: {c['prompt_len']} prompt tokens + a uniform response "
        f"length; {c['concurrency']} clients x {c['items_per_request']} items/request; "
        f"{c['seconds']:g} s per measurement after a warm-up of >= {c['warmup']:g} s (until "
        f"every client had a response); seed {c['seed']}; {c['workers']} forward threads x "
        f"{c['torch_threads']} torch threads, {c['cpus']} CPUs; engine batches <= "
        f"{c['max_batch_tokens']} padded tokens, <= {c['max_batch_size']} rows, padding "
        f"weighed against a forward's overhead of ~{c['overhead_tokens']:.0f} tokens (measured "
        f"in the bench process); model traced: {c['traced']}.",
        *(f"- note: {n}" for n in result["notes"]),
    ]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _main_table(mixes: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| mix | raw tok/s | server tok/s | naive tok/s | server/raw | server/naive "
             "| padding | server >= 0.8 x raw | server >= naive (1.5 x on 8-32) "
             "| padding <= 1.2 |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for name, m in mixes.items():
        label = name if m["note"] is None else f"{name} (as {m['range'][0]}-{m['range'][1]})"
        cells = [label, _num(m["raw"]["tokens_per_s"]), _num(m["server"]["tokens_per_s"]),
                 _num(m["naive"]["tokens_per_s"]), _num(m["server_over_raw"], ".2f"),
                 _num(m["server_over_naive"], ".2f"), _num(m["server"]["padding_ratio"], ".3f"),
                 *(_met(ok) for ok in m["floors"].values())]
        lines.append(_row(cells))
    return lines


def _detail_table(mixes: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| mix | server req/s | server p50 / p99 ms | naive req/s | naive p50 / p99 ms "
             "| raw padding | naive padding | errors server, naive | warm-up s server, naive "
             "| server / ceiling |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in mixes.items():
        s, n = m["server"], m["naive"]
        cells = [name, f"{s['requests_per_s']:.1f}", f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f}",
                 f"{n['requests_per_s']:.1f}", f"{n['p50_ms']:.0f} / {n['p99_ms']:.0f}",
                 f"{m['raw']['padding_ratio']:.3f}", f"{n['request_padding_ratio']:.3f}",
                 f"{s['errors']}, {n['errors']}", f"{s['warmup_s']:.1f}, {n['warmup_s']:.1f}",
                 f"{m['ceiling_fraction']:.1%}"]
        lines.append(_row(cells))
    return lines


def _grpc_table(mixes: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| mix | HTTP tok/s | gRPC unary tok/s | gRPC stream tok/s | unary/HTTP | stream/HTTP "
             "| unary p50 / p99 ms | stream p50 / p99 ms | errors unary, stream "
             "| unary >= 0.95 x HTTP | stream >= 0.95 x HTTP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, m in mixes.items():
        u, st = m["grpc"], m["grpc_stream"]
        cells = [name, _num(m["server"]["tokens_per_s"]), _num(u["tokens_per_s"]),
                 _num(st["tokens_per_s"]), f"{m['grpc_over_http']:.2f}",
                 f"{m['stream_over_http']:.2f}", f"{u['p50_ms']:.0f} / {u['p99_ms']:.0f}",
                 f"{st['p50_ms']:.0f} / {st['p99_ms']:.0f}", f"{u['errors']}, {st['errors']}",
                 *(_met(ok) for ok in m["grpc_floors"].values())]
        lines.append(_row(cells))
    return lines


def _footer(result: dict[str, Any]) -> list[str]:
    lat, ceil, tr = result["latency"], result["ceiling"], result["transports"]
    rates = ", ".join(f"{t} {tr[t]['requests_per_s']:,.0f} req/s (p50 {tr[t]['p50_ms']:.1f} ms, "
                      f"server CPU {tr[t]['server_cpu_ms_per_request']:.3f} ms/request)"
                      for t in TRANSPORTS)
    shares = ", ".join(f"{k} {m['ceiling_fraction']:.1%}" for k, m in result["mixes"].items())
    return [
        f"- transports, single-item requests with one-token responses: {rates}; gRPC unary / "
        f"HTTP {tr['grpc_over_http']:.2f} (floor 1.2: {_met(tr['floors']['grpc_ge_1.2_http'])}), "
        f"stream / unary {tr['stream_over_unary']:.2f} (floor 1.0: "
        f"{_met(tr['floors']['stream_ge_unary'])})",
        f"- latency at concurrency 1 (mix {lat['mix']}, {lat['requests']} single-item "
        f"requests): p50 {lat['p50_ms']:.2f} ms; in-process forward p50 "
        f"{lat['forward_p50_ms']:.2f} ms; floor 1.3 x forward + 5 ms = {lat['floor_ms']:.2f} ms: "
        f"{_met(lat['met'])}",
        f"- ceiling: fp32 matmul (2048x2048) {ceil['matmul_gflops']:.1f} GFLOP/s / "
        f"(2 x {ceil['params']:,} params) = {ceil['tokens_per_s']:,.0f} tok/s; server share: "
        + shares,
        "- tok/s: prompt + response tokens; a request's tokens count in proportion to the part "
        "of its lifetime inside the window. padding: padded / real tokens from the server's "
        "/metrics over the window; naive: each request padded alone; raw: the same batching "
        "in process.",
        f"- rewards: servers vs in-process forward, max |diff| "
        f"{result['agreement_max_abs_diff']:.2e}",
    ]


# ---------------------------------------------------------------- entry point


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the demo model)")
    p.add_argument("--seconds", type=float, help="measured seconds per load (15; quick: 3)")
    p.add_argument("--warmup", type=float, help="seconds before each window (2; quick: 0.5)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    p.add_argument("--items-per-request", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: short windows, 30 latency requests")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="directory for serve.json/.md (serve-<N>item.* for N items per request)")
    return p.parse_args()


def options(args: argparse.Namespace) -> Options:
    def pick(value: float | None, full: float, quick: float) -> float:
        return value if value is not None else (quick if args.quick else full)

    return Options(seconds=pick(args.seconds, 15.0, 3.0), warmup=pick(args.warmup, 2.0, 0.5),
                   concurrency=args.concurrency, items_per_request=args.items_per_request,
                   seed=args.seed, latency_requests=30 if args.quick else 200,
                   matmul_seconds=0.5 if args.quick else 2.0,
                   max_settle=5.0 if args.quick else 60.0, quick=args.quick)


def main() -> None:
    args = parse_args()
    result = run(args, options(args))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "serve" if args.items_per_request == 16 else f"serve-{args.items_per_request}item"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    report = render(result)
    (args.out / f"{stem}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
