"""RLHF-shaped benchmark on a reward model of realistic size: prompt-prefix reuse and dtypes.

A 26M-parameter Llama token RM (random weights: speed does not depend on them) is built into
runs/bench/. A trainer's rollout batch is 16 prompts (64-512 tokens) x 8 samples (responses of
16-256 tokens), scored in rounds as trainers do: all of it at once, then the next round. Two
ways of sending it: each sample as its own request from its own client (128 at once, as
OpenRLHF's remote reward calls do) and one request per prompt (16 at once, 8 items each).

Servers, each started as its own process on 127.0.0.1: the naive server (bench/naive_server.py,
one padded forward per request in the handler), `tokenrm serve` with prefix reuse off and on,
at float32 and with TOKENRM_DTYPE=auto. Reported per server and way of sending: tokens/s
(prompt + response tokens of every sample, the same count for every column), the ratio to the
server without reuse at float32, the share of the measured ceiling (fp32 matmul FLOP/s over the
FLOPs of the full forward of every sample, attention included; reuse computes fewer, so its
share can pass 100%), the server's peak RSS; and how far each configuration's rewards are from
float32 without reuse on the same samples. Writes bench/results/rlhf.json and .md.

    python bench/rlhf_bench.py [--seconds 20] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from load import Body, Row, Target, _HttpClient, to_bodies
from serve_bench import matmul_gflops, running
from transformers import AutoTokenizer, LlamaConfig, LlamaForTokenClassification

from tokenrm.demo import checkpoint
from tokenrm.server.launcher import free_port
from tokenrm.server.model import RewardModel, pad_id
from tokenrm.server.precision import convert, max_delta, native_bf16

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
NAIVE_SERVER = HERE / "naive_server.py"
PROMPTS, SAMPLES = 16, 8
PROMPT_LENGTHS, RESPONSE_LENGTHS = (64, 512), (16, 256)
FIRST_ID = 3                     # ids below are special tokens
# (column, server, environment): the naive server takes no settings
def _env(dtype: str, reuse: bool) -> dict[str, str]:
    return {"TOKENRM_DTYPE": dtype, "TOKENRM_PREFIX_REUSE": str(reuse).lower()}


SERVERS = (("naive", "naive", {}),
           ("fp32", "tokenrm", _env("float32", False)),
           ("fp32 + reuse", "tokenrm", _env("float32", True)),
           ("auto", "tokenrm", _env("auto", False)),
           ("auto + reuse", "tokenrm", _env("auto", True)),
           ("int8 + reuse", "tokenrm", _env("int8", True)))
BASELINE = "fp32"
SENDING = {"per-sample": 1, "per-prompt": SAMPLES}     # items per request


@dataclass(frozen=True)
class Shape:
    hidden: int = 512
    layers: int = 8
    intermediate: int = 1408
    heads: int = 8
    max_len: int = 1024


def build_model(path: Path, shape: Shape) -> tuple[Path, int]:
    """The benchmark's RM (the demo tokenizer, random weights) at `path`; its parameters."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint())
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, max_position_embeddings=shape.max_len,
                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"})
    model = LlamaForTokenClassification(config)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def rollout(vocab_size: int, seed: int) -> list[Row]:
    """16 prompts x 8 samples, prompt-major: (prompt + response ids, response length)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(PROMPTS):
        prompt = [rng.randrange(FIRST_ID, vocab_size) for _ in range(rng.randint(*PROMPT_LENGTHS))]
        for _ in range(SAMPLES):
            n = rng.randint(*RESPONSE_LENGTHS)
            rows.append((prompt + [rng.randrange(FIRST_ID, vocab_size) for _ in range(n)], n))
    return rows


def forward_flops(rows: Sequence[Row], shape: Shape, params: int, vocab_size: int) -> float:
    """FLOPs of the full forward of each row: 2 x non-embedding parameters per token, and
    attention's two T x T x hidden products per layer (counted whole, as SDPA computes)."""
    dense = params - vocab_size * shape.hidden
    return sum(2 * dense * len(ids) + 4 * shape.layers * len(ids) ** 2 * shape.hidden
               for ids, _ in rows)


# ---------------------------------------------------------------- a server under rounds


async def rounds(target: Target, bodies: Sequence[Body], seconds: float) -> dict[str, float]:
    """Send every body at once, each from its own client, wait for all; repeat. One round to
    warm up, then rounds until `seconds` have passed; tokens/s over those rounds."""
    clients = [_HttpClient(target, [b]) for b in bodies]
    tokens = sum(b.tokens for b in bodies)

    async def call(client: _HttpClient, body: Body) -> bool:
        try:
            return await client.call(body)
        finally:  # a new connection each time, as trainers' plain HTTP posts do (and an idle
            await client.close()  # keep-alive connection would be closed between rounds)

    async def one_round() -> float:
        started = time.perf_counter()
        ok = await asyncio.gather(*(call(c, b) for c, b in zip(clients, bodies, strict=True)))
        if not all(ok):
            raise RuntimeError(f"{ok.count(False)} of {len(ok)} requests failed")
        return time.perf_counter() - started

    await one_round()
    times: list[float] = []
    while not times or sum(times) < seconds:
        times.append(await one_round())
    return {"tokens_per_s": tokens * len(times) / sum(times), "rounds": len(times),
            "round_s_p50": float(np.median(times))}


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reused_tokens(url: str) -> float:
    """The server's count of prompt tokens computed once for several rows (0 for the naive
    server, which has no such metric)."""
    response = httpx.get(f"{url}/metrics", timeout=30)
    if response.status_code != 200:
        return 0.0
    text = response.text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("tokenrm_prompt_tokens_reused_total "))


def reusable_tokens(rows: Sequence[Row]) -> int:
    """Prompt tokens a round could compute once instead of once per sample."""
    return sum((SAMPLES - 1) * (len(ids) - n) for ids, n in rows[::SAMPLES])


def rewards_of(url: str, bodies: Sequence[Body]) -> list[np.ndarray]:
    out = []
    for body in bodies:
        r = httpx.post(f"{url}/score", content=body.json, timeout=300,
                       headers={"content-type": "application/json"})
        r.raise_for_status()
        out += [np.asarray(x["rewards"], dtype=np.float32) for x in r.json()["results"]]
    return out


@contextmanager
def server(kind: str, model: Path, env: dict[str, str]):  # type: ignore[no-untyped-def]
    port = free_port()
    if kind == "naive":
        command = [sys.executable, str(NAIVE_SERVER), "--model", str(model), "--port", str(port)]
        with running("naive server", command, port, "/healthz") as target:
            yield target, {}
        return
    command = [sys.executable, "-m", "tokenrm.cli.main", "serve", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"]
    with running("tokenrm serve", command, port, "/readyz",
                 env={"TOKENRM_REQUEST_TIMEOUT_S": "600", **env}) as target:
        yield target, httpx.get(f"{target.url}/v1/model", timeout=30).json()


def measure(model: Path, rows: Sequence[Row], seconds: float) -> dict[str, Any]:
    per_prompt = to_bodies(rows, SAMPLES)
    out: dict[str, Any] = {}
    for column, kind, env in SERVERS:
        with server(kind, model, env) as (target, info):
            print(f"[{column}] {info.get('dtype', 'float32')}, prefix reuse "
                  f"{info.get('prefix_reuse', False)}", flush=True)
            result: dict[str, Any] = {"dtype": info.get("dtype", "float32"),
                                      "dtype_delta": info.get("dtype_delta"),
                                      "prefix_reuse": info.get("prefix_reuse", False)}
            for sending, per_request in SENDING.items():
                before = reused_tokens(target.url)
                result[sending] = asyncio.run(rounds(target, to_bodies(rows, per_request),
                                                     seconds))
                result[sending]["reused_share"] = ((reused_tokens(target.url) - before)
                                                   / reusable_tokens(rows)
                                                   / (result[sending]["rounds"] + 1))
                print(f"  {sending}: {result[sending]['tokens_per_s']:,.0f} tok/s", flush=True)
            result["rewards"] = rewards_of(target.url, per_prompt)
            result["peak_rss_mb"] = peak_rss_mb(target.pid)
        out[column] = result
    return out


# ---------------------------------------------------------------- report


def report(runs: dict[str, Any], setup: dict[str, Any]) -> tuple[dict[str, Any], str]:
    reference = runs[BASELINE]["rewards"]
    table, summary = [], {}
    for column, r in runs.items():
        delta = max(float(np.abs(a - b).max()) for a, b in zip(r["rewards"], reference,
                                                                strict=True))
        row = {"dtype": r["dtype"], "dtype_delta_at_start": r["dtype_delta"],
               "prefix_reuse": r["prefix_reuse"], "max_reward_delta_vs_fp32": delta,
               "peak_rss_mb": r["peak_rss_mb"]}
        for sending in SENDING:
            tok_s = r[sending]["tokens_per_s"]
            row[sending] = {**r[sending], "vs_fp32": tok_s / runs[BASELINE][sending][
                "tokens_per_s"], "ceiling_share": tok_s / setup["ceiling_tokens_per_s"]}
        summary[column] = row
        table.append(f"| {column} | {r['dtype']} | {'on' if r['prefix_reuse'] else 'off'} | "
                     + " | ".join(f"{row[s]['tokens_per_s']:,.0f} ({row[s]['vs_fp32']:.2f}x, "
                                  f"{row[s]['ceiling_share']:.0%})" for s in SENDING)
                     + f" | {delta:.1e} | {r['peak_rss_mb']:,.0f} |")
    reuse = summary["fp32 + reuse"]["per-prompt"]["vs_fp32"]
    auto = summary["auto"]
    lines = [
        "# RLHF-shaped workload on a 26M-parameter token RM",
        "",
        f"Command: `cd bench && ../.venv/bin/python rlhf_bench.py` ({setup['date']}). Model: "
        f"Llama token RM, {setup['params']:,} parameters (hidden {setup['shape']['hidden']}, "
        f"{setup['shape']['layers']} layers, random weights), {setup['cores']} CPU cores, "
        f"native bf16: {setup['native_bf16']}. Workload: {PROMPTS} prompts x {SAMPLES} samples, "
        f"prompts {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]} tokens, responses "
        f"{RESPONSE_LENGTHS[0]}-{RESPONSE_LENGTHS[1]}; {setup['tokens']:,} tokens a round, "
        "scored in rounds (all samples at once, then the next round) for "
        f">= {setup['seconds']:g} s per cell after one warm-up round.",
        "",
        "tokens/s (x the fp32 server without reuse, share of the ceiling) | max |reward "
        "difference| from fp32 without reuse on the same samples | peak RSS of the server",
        "",
        "| server | dtype | prefix reuse | each sample its own request (128 at once) | "
        "one request per prompt (16 x 8 items) | max |Δreward| | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
        *table,
        "",
        f"- Ceiling: fp32 matmul {setup['matmul_gflops']:.1f} GFLOP/s (2048 x 2048, the faster of "
        "a measurement before and after the servers') / "
        f"{setup['flops_per_token']:,.0f} FLOPs per token of the full forward (attention "
        f"included) = {setup['ceiling_tokens_per_s']:,.0f} tok/s. With reuse fewer FLOPs are "
        "computed than counted, so its share can pass 100%.",
        f"- Prefix reuse, one request per prompt: {reuse:.2f}x the tok/s of no reuse at fp32 "
        "(floor 1.6x); rewards within "
        f"{summary['fp32 + reuse']['max_reward_delta_vs_fp32']:.1e} (floor 1e-5). Of the "
        "prompt tokens a round could compute once instead of once per sample, the server "
        "computed once " + ", ".join(
            f"{summary[c][s]['reused_share']:.0%} ({c}, {s})" for c in ("fp32 + reuse",
                                                                    "auto + reuse")
            for s in SENDING) + "; the rest was computed more than once in a round, the most "
        "a cache of prompts kept across batches could add.",
        f"- dtype auto chose {auto['dtype']} (start-up check: "
        f"{auto['dtype_delta_at_start'] if auto['dtype_delta_at_start'] is not None else '-'}); "
        f"{auto['per-prompt']['vs_fp32']:.2f}x fp32 per prompt, "
        f"{auto['per-sample']['vs_fp32']:.2f}x per sample; max |Δreward| "
        f"{auto['max_reward_delta_vs_fp32']:.4f} (floor 0.02).",
        "- The start-up check (max |reward difference| from float32 on the probe batches, "
        "limit 0.02) per model: " + "; ".join(
            f"{name}: bfloat16 {c['bfloat16']:.4f}, int8 {c['int8']:.4f}, auto serves {c['auto']}"
            for name, c in setup["precision"].items()) + ".",
    ]
    return {"setup": setup, "servers": summary}, "\n".join(lines) + "\n"


def precision_checks(models: dict[str, Path]) -> dict[str, dict[str, float | str]]:
    """Per model: the start-up check's max |reward difference| from float32 for bf16 and int8
    (server/precision.py's probes), and what dtype auto serves."""
    out: dict[str, dict[str, float | str]] = {}
    for name, path in models.items():
        rm = RewardModel.load(path, dtype="float32", trace=False)
        pad = pad_id(rm.tokenizer)
        out[name] = {dtype: max_delta(rm.model, convert(rm.model, dtype), pad,
                                      rm.info.vocab_size) for dtype in ("bfloat16", "int8")}
        out[name]["auto"] = RewardModel.load(path, dtype="auto", trace=False).info.dtype
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per server and sending")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 s per cell: a smoke run")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    shape = Shape()
    model, params = build_model(ROOT / "runs" / "bench" / "rm-26m", shape)
    vocab = len(AutoTokenizer.from_pretrained(model))
    rows = rollout(vocab, args.seed)
    tokens = sum(len(ids) for ids, _ in rows)
    matmul_s = 2.0 if args.quick else 5.0
    before = matmul_gflops(matmul_s)
    runs = measure(model, rows, seconds)
    gflops = max(before, matmul_gflops(matmul_s))  # before and after: the quieter of the two
    flops_per_token = forward_flops(rows, shape, params, vocab) / tokens
    setup = {"date": time.strftime("%Y-%m-%d"), "params": params, "shape": asdict(shape),
             "cores": len(os.sched_getaffinity(0)), "native_bf16": native_bf16("cpu"),
             "tokens": tokens, "seconds": seconds, "matmul_gflops": gflops,
             "flops_per_token": flops_per_token,
             "ceiling_tokens_per_s": gflops * 1e9 / flops_per_token}
    setup["precision"] = precision_checks({"demo": checkpoint(), "26M": model})
    result, text = report(runs, setup)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "rlhf.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "rlhf.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
