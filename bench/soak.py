"""Load and soak: `tokenrm serve` at about twice its measured capacity, over HTTP and gRPC at once.

1. A fixed pool of requests (token-id items of mixed lengths) and their expected rewards, from
   the direct forward in this process: each item alone, eager (untraced), unpadded.
2. The server (`tokenrm serve`, HTTP and gRPC, one process) with its request timeout set to
   the clients' deadline, so that HTTP requests have the deadline gRPC calls propagate.
3. Capacity: a closed loop (half the clients on HTTP, half on gRPC unary) for a few seconds:
   successful requests/s.
4. Soak: an open loop sending `rate_factor` x capacity requests/s for `duration_s`, alternating
   HTTP and gRPC unary, each with a deadline; at most `max_outstanding` requests in flight (a
   request due when the bound is reached is not sent, and counted as such). Every answer is
   classified: ok (a 200 whose rewards match the expected ones), refused (429 /
   RESOURCE_EXHAUSTED), wrong, server error (5xx / INTERNAL / UNKNOWN / UNAVAILABLE / a broken
   connection), timed out (not ended by the deadline + a grace: a hang), expired (accepted,
   then ended at its deadline unscored: gRPC DEADLINE_EXCEEDED, HTTP 503 deadline_exceeded),
   other.
5. The server's resident memory (VmRSS) every second.

Writes bench/results/soak.json and soak.md (printed too); exits 1 when a must-be-zero count
(wrong, server error, timed out, other) is not zero, more than `max_expired_share` of a
transport's accepted requests expired, a
transport had no success, or the memory is not flat.

    python bench/soak.py [--duration 60] [--model DIR] [--rate-factor 2.0] [--deadline-s 5]

gRPC streaming is not driven: ScoreStream has no per-request deadline (the call's deadline
ends the whole stream), so it does not fit "each request with a deadline".

The reusable parts (Options, run, render) are imported by tests/test_soak.py, the short CI run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import orjson
import torch
import uvloop
from load import SCORE, Body, cpu_seconds, metrics_text, to_bodies
from wire import Connection, WireError

from tokenrm.proto import reward_pb2 as pb
from tokenrm.server.launcher import serve
from tokenrm.server.model import RewardModel

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FIRST_ID = 3                 # ids below are special tokens (pad, bos, eos)
PROMPT_LEN = (4, 32)
# Response lengths: (share, lo, hi); capped so that prompt + response fits the model.
RESPONSE_MIX = ((0.6, 1, 32), (0.3, 33, 128), (0.1, 129, 384))
KEEPALIVE_SAFE_S = 3.0       # reuse an idle HTTP connection younger than this (uvicorn: 5 s)
EXAMPLES = 5                 # kept per outcome, for the report
TRANSPORTS = ("http", "grpc")
OUTCOMES = ("ok", "refused", "wrong", "server_error", "timed_out", "expired", "other")
MUST_BE_ZERO = ("wrong", "server_error", "timed_out", "other")
SERVER_ERRORS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                 grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS)

Row = tuple[list[int], int]  # model input ids, number of trailing response tokens


@dataclass(frozen=True)
class Options:
    duration_s: float = 60.0      # the soak
    rate_factor: float = 2.0      # soak rate = this x the measured capacity
    deadline_s: float = 5.0       # per request; also the server's TOKENRM_REQUEST_TIMEOUT_S
    grace_s: float = 1.0          # HTTP: how long after the deadline an answer still counts
    capacity_s: float = 5.0       # the closed-loop window
    capacity_warmup_s: float = 1.0
    concurrency: int = 32         # closed-loop clients, half per transport
    max_outstanding: int = 1024   # the open loop's bound on requests in flight
    grpc_channels: int = 8        # gRPC connections (HTTP: one per request in flight)
    requests: int = 200           # distinct request bodies
    min_items: int = 4
    max_items: int = 16
    seed: int = 0
    rss_warmup_s: float | None = None  # RSS baseline window from here; None: min(10 s, 1/4)
    rss_growth_pct: float = 10.0  # flat: end - baseline <= min(pct of baseline, mb)
    rss_growth_mb: float = 50.0
    tolerance: float = 1e-4       # max |reward - expected| of a correct answer
    server_env: dict[str, str] = field(default_factory=dict)  # more TOKENRM_* for the server
    max_expired_share: float = 0.005  # of a transport's accepted requests (ok or expired)

    @property
    def rss_warmup(self) -> float:
        if self.rss_warmup_s is not None:
            return self.rss_warmup_s
        return min(10.0, self.duration_s / 4)

    @property
    def rss_window(self) -> float:
        """The RSS baseline and end are medians over windows this long."""
        return min(5.0, self.duration_s / 4)


# ---------------------------------------------------------------- the request pool


@dataclass(frozen=True)
class Expected:
    lengths: tuple[int, ...]     # rewards per item
    flat: np.ndarray             # all items' rewards, concatenated


def make_requests(vocab_size: int, max_len: int, opts: Options) -> list[list[Row]]:
    """`opts.requests` requests of min_items..max_items token items of mixed lengths."""
    rng = random.Random(opts.seed)
    requests = []
    for _ in range(opts.requests):
        rows = []
        for _ in range(rng.randint(opts.min_items, opts.max_items)):
            prompt = rng.randint(*PROMPT_LEN)
            lo, hi = _response_range(rng.random())
            n = max(1, min(rng.randint(lo, hi), max_len - prompt))
            rows.append(([rng.randrange(FIRST_ID, vocab_size) for _ in range(prompt + n)], n))
        requests.append(rows)
    return requests


def _response_range(u: float) -> tuple[int, int]:
    """The (lo, hi) of RESPONSE_MIX that `u` in [0, 1) falls in."""
    for share, lo, hi in RESPONSE_MIX:
        if u < share:
            return lo, hi
        u -= share
    return RESPONSE_MIX[-1][1:]


def expected_rewards(model: RewardModel, requests: Sequence[Sequence[Row]]) -> list[Expected]:
    """The direct forward: each item alone (no padding, no batching). On one torch thread:
    single small items gain nothing from more, and on a busy machine the threads' spinning
    made this ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for rows in requests:
            rewards = [model.score([row])[0] for row in rows]
            out.append(Expected(tuple(len(r) for r in rewards),
                                np.concatenate(rewards).astype(np.float64)))
        return out
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- outcomes


class Verdict(NamedTuple):
    outcome: str
    detail: str = ""
    diff: float = 0.0            # max |reward - expected| of a 200
    hint: bool = True            # a refusal carried a retry hint


def judge_rewards(expected: Expected, lengths: tuple[int, ...], flat: np.ndarray,
                  tolerance: float, transport: str) -> Verdict:
    if lengths != expected.lengths:
        return Verdict("wrong", f"{transport}: rewards per item {lengths}, expected "
                       f"{expected.lengths}")
    diff = float(np.max(np.abs(flat - expected.flat))) if flat.size else 0.0
    if not diff <= tolerance:  # NaN too
        return Verdict("wrong", f"{transport}: max |reward - expected| {diff:.3g}", diff)
    return Verdict("ok", diff=diff)


@dataclass
class Tally:
    """What one transport saw in one phase."""

    counts: Counter[str] = field(default_factory=Counter)
    ok_ms: list[float] = field(default_factory=list)
    refused_ms: list[float] = field(default_factory=list)
    max_diff: float = 0.0
    refused_without_hint: int = 0
    planned: int = 0
    not_sent: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, v: Verdict, ms: float) -> None:
        self.counts[v.outcome] += 1
        if v.outcome in ("ok", "wrong"):
            self.max_diff = max(self.max_diff, v.diff if v.diff == v.diff else math.inf)
        if v.outcome == "ok":
            self.ok_ms.append(ms)
        elif v.outcome == "refused":
            self.refused_ms.append(ms)
            self.refused_without_hint += not v.hint
        if v.detail:
            self.reasons[f"{v.outcome}: {_reason(v.detail)}"] += 1
            kept = self.examples.setdefault(v.outcome, [])
            if len(kept) < EXAMPLES:
                kept.append(f"{v.detail} (after {ms:.0f} ms)")

    def summary(self) -> dict[str, Any]:
        sent = sum(self.counts.values())
        return {"planned": self.planned, "sent": sent, "not_sent": self.not_sent,
                **{o: self.counts[o] for o in OUTCOMES},
                "ok_ms": _percentiles(self.ok_ms), "refused_ms": _percentiles(self.refused_ms),
                "max_abs_diff": self.max_diff, "refused_without_hint": self.refused_without_hint,
                "reasons": dict(self.reasons.most_common()), "examples": self.examples}


def _reason(detail: str) -> str:
    """The detail without numbers, so that like failures count together."""
    return re.sub(r"\d+(\.\d+)?", "N", detail)[:160]


def _percentiles(ms: Sequence[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50": None, "p99": None, "max": None}
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


# ---------------------------------------------------------------- the two clients


class _Conn(Connection):
    """wire.Connection that remembers when it was last used."""

    last_used = 0.0


class HttpCaller:
    """POST /score with pre-built request bytes; one keep-alive connection per request in
    flight, reused newest first (idle ones past KEEPALIVE_SAFE_S are closed, not reused: the
    server may have closed them)."""

    def __init__(self, url: str, bodies: Sequence[Body], expected: Sequence[Expected],
                 opts: Options) -> None:
        template = Connection.to(url)
        self.host, self.port = template.host, template.port
        self.requests = [template.request("POST", "/score", b.json) for b in bodies]
        self.expected, self.opts = expected, opts
        self.idle: list[_Conn] = []

    def _connection(self) -> _Conn:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if now - conn.last_used < KEEPALIVE_SAFE_S:
                return conn
            conn.close()
        return _Conn(self.host, self.port)

    async def call(self, i: int) -> Verdict:
        conn = self._connection()
        wait = self.opts.deadline_s + self.opts.grace_s
        try:
            status, head, body = await asyncio.wait_for(conn.exchange(self.requests[i]), wait)
        except (TimeoutError, asyncio.TimeoutError):
            return Verdict("timed_out", f"http: no answer within {wait:g} s")
        except (OSError, asyncio.IncompleteReadError, WireError) as exc:
            return Verdict("server_error", f"http: connection failed: {type(exc).__name__}: "
                           f"{exc}")
        conn.last_used = time.monotonic()
        if b"\r\nconnection: close" in head.lower():
            conn.close()
        else:
            self.idle.append(conn)
        return self._judge(i, status, head, body)

    def _judge(self, i: int, status: int, head: bytes, body: bytes) -> Verdict:
        if status == 200:
            try:
                results = orjson.loads(body)["results"]
                lengths = tuple(len(r["rewards"]) for r in results)
                flat = np.fromiter(itertools.chain.from_iterable(r["rewards"] for r in results),
                                   np.float64)
            except (ValueError, KeyError, TypeError) as exc:
                return Verdict("wrong", f"http 200 with an unreadable body: {exc}")
            return judge_rewards(self.expected[i], lengths, flat, self.opts.tolerance, "http")
        try:
            code = str(orjson.loads(body)["error"]["code"])
        except (ValueError, KeyError, TypeError):
            code = "?"
        detail = f"http {status} {code}: {body[:200].decode(errors='replace')}"
        if status == 429:
            return Verdict("refused", hint=b"\r\nretry-after:" in head.lower())
        if status == 503 and code == "deadline_exceeded":
            return Verdict("expired", detail)
        return Verdict("server_error" if status >= 500 else "other", detail)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class GrpcCaller:
    """Score (unary) with bytes in and out and a deadline, which the server sees too; calls
    take the channels (each its own connection) in turn, as many clients would."""

    def __init__(self, channels: Sequence[grpc.aio.Channel], bodies: Sequence[Body],
                 expected: Sequence[Expected], opts: Options) -> None:
        self.stubs = itertools.cycle([c.unary_unary(SCORE) for c in channels])
        self.protos = [b.proto for b in bodies]
        self.expected, self.opts = expected, opts

    async def call(self, i: int) -> Verdict:
        d = self.opts.deadline_s
        try:
            # the outer bound only guards the driver: gRPC itself ends the call at `d`
            answer = await asyncio.wait_for(next(self.stubs)(self.protos[i], timeout=d),
                                            d + self.opts.grace_s)
        except (TimeoutError, asyncio.TimeoutError):
            return Verdict("timed_out", f"grpc: the call did not end within {d:g} + "
                           f"{self.opts.grace_s:g} s")
        except grpc.aio.AioRpcError as exc:
            return self._judge_error(exc)
        response = pb.ScoreResponse.FromString(answer)
        lengths = tuple(len(r.rewards) for r in response.results)
        flat = np.fromiter(itertools.chain.from_iterable(r.rewards for r in response.results),
                           np.float64)
        return judge_rewards(self.expected[i], lengths, flat, self.opts.tolerance, "grpc")

    @staticmethod
    def _judge_error(exc: grpc.aio.AioRpcError) -> Verdict:
        code = exc.code()
        metadata = dict(exc.trailing_metadata() or ())
        ours = metadata.get("tokenrm-error-code")  # set by the server on the errors it raises
        detail = f"grpc {code.name} {ours or ''}: {(exc.details() or '')[:200]}"
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and ours == "overloaded":
            return Verdict("refused", hint="retry-after-ms" in metadata)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # The call ended at its deadline: the server gave up on it (its error code is in
            # the trailers) or, a race of milliseconds, the client's own timer fired first.
            who = "by the server" if ours else "by the client's timer"
            return Verdict("expired", f"grpc DEADLINE_EXCEEDED {who}: {exc.details()}")
        if code in SERVER_ERRORS:
            return Verdict("server_error", detail)
        return Verdict("other", detail)


# ---------------------------------------------------------------- server memory and counters


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS, Linux /proc), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


async def sample_rss(pid: int, t0: float, samples: list[tuple[float, float]],
                     every_s: float = 1.0) -> None:
    while True:
        samples.append((time.perf_counter() - t0, rss_mb(pid)))
        await asyncio.sleep(every_s)


async def server_counters(url: str) -> dict[str, float]:
    """tokenrm_requests_total by transport and code, and tokenrm_refused_total, from /metrics."""
    counters = {}
    for line in (await metrics_text(url)).splitlines():
        m = re.match(r"^tokenrm_requests_total\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
            counters[f"{labels.get('transport')} {labels.get('code')}"] = float(m[2])
        elif line.startswith("tokenrm_refused_total "):
            counters["refused (engine)"] = float(line.split()[1])
    return counters


# ---------------------------------------------------------------- the two phases


async def safe_call(caller: HttpCaller | GrpcCaller, i: int, transport: str) -> Verdict:
    """caller.call, with anything it did not expect counted as `other`, not raised."""
    try:
        return await caller.call(i)
    except Exception as exc:  # a bug here or an answer nobody foresaw: count it, go on
        return Verdict("other", f"{transport}: {type(exc).__name__}: {exc}")


async def closed_loop(callers: dict[str, Any], n: int, pid: int,
                      opts: Options) -> dict[str, Any]:
    """`opts.concurrency` clients, half per transport, each sending its next request when the
    last one is answered: successful requests/s over a window after a warm-up."""
    tallies = {t: Tally() for t in callers}
    done: dict[str, list[float]] = {t: [] for t in callers}
    stop_at = math.inf

    async def client(transport: str, first: int) -> None:
        for i in itertools.count(first):
            started = time.perf_counter()
            if started >= stop_at:
                return
            v = await safe_call(callers[transport], i % n, transport)
            ended = time.perf_counter()
            tallies[transport].add(v, (ended - started) * 1000)
            if v.outcome == "ok":
                done[transport].append(ended)
            else:
                await asyncio.sleep(0.05)

    per = max(1, opts.concurrency // len(callers))
    tasks = [asyncio.create_task(client(t, k * max(1, n // per)))
             for t in callers for k in range(per)]
    await asyncio.sleep(opts.capacity_warmup_s)
    start, cpu0 = time.perf_counter(), cpu_seconds(pid)
    stop_at = end = start + opts.capacity_s
    await asyncio.sleep(opts.capacity_s)
    cpu = cpu_seconds(pid) - cpu0
    await asyncio.gather(*tasks)
    rates = {t: sum(start <= x <= end for x in done[t]) / opts.capacity_s for t in callers}
    total = sum(rates.values())
    return {"requests_per_s": total, "per_transport": rates,
            "server_cpu_cores": cpu / opts.capacity_s,
            "ok_per_server_cpu_s": total * opts.capacity_s / cpu if cpu else None,
            "clients": per * len(callers), "window_s": opts.capacity_s,
            "outcomes": {t: tallies[t].summary() for t in callers}}


async def open_loop(callers: dict[str, Any], n: int, rate: float,
                    opts: Options) -> dict[str, Any]:
    """Requests at `rate`/s for opts.duration_s, alternating transports, whatever the answers;
    at most opts.max_outstanding in flight (a request due beyond that is not sent)."""
    transports = list(callers)
    tallies = {t: Tally() for t in transports}
    tasks: set[asyncio.Task[None]] = set()
    lags: list[float] = []
    outstanding = 0

    async def one(transport: str, i: int) -> None:
        nonlocal outstanding
        started = time.perf_counter()
        try:
            v = await safe_call(callers[transport], i, transport)
        finally:
            outstanding -= 1
        tallies[transport].add(v, (time.perf_counter() - started) * 1000)

    start = time.perf_counter()
    end = start + opts.duration_s
    for k in itertools.count():
        due = start + k / rate
        if due >= end:
            break
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
            now = time.perf_counter()
        lags.append(now - due)
        transport = transports[k % len(transports)]
        tallies[transport].planned += 1
        if outstanding >= opts.max_outstanding:
            tallies[transport].not_sent += 1
            continue
        outstanding += 1
        task = asyncio.create_task(one(transport, (k // len(transports)) % n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_for = time.perf_counter() - start
    await asyncio.gather(*list(tasks))
    lag = np.asarray(lags) * 1000
    return {"target_rate": rate, "sent_for_s": sent_for,
            "send_rate": sum(t.planned - t.not_sent for t in tallies.values()) / sent_for,
            "send_lag_ms": {"p50": float(np.percentile(lag, 50)),
                            "p99": float(np.percentile(lag, 99)), "max": float(lag.max())},
            "drained_s": time.perf_counter() - start - sent_for,
            "tallies": tallies}


async def drive(url: str, grpc_target: str, pid: int, bodies: Sequence[Body],
                expected: Sequence[Expected], opts: Options) -> dict[str, Any]:
    """Capacity, then the soak, against a running server; with its memory sampled."""
    t0 = time.perf_counter()
    rss: list[tuple[float, float]] = []
    marks: dict[str, float] = {"idle": rss_mb(pid)}
    sampler = asyncio.create_task(sample_rss(pid, t0, rss))
    async with contextlib.AsyncExitStack() as stack:
        # a local subchannel pool: each channel its own connection, not one shared
        channels = [await stack.enter_async_context(grpc.aio.insecure_channel(
            grpc_target, options=[("grpc.use_local_subchannel_pool", 1)]))
            for _ in range(opts.grpc_channels)]
        http = HttpCaller(url, bodies, expected, opts)
        callers = {"http": http, "grpc": GrpcCaller(channels, bodies, expected, opts)}
        say(f"[capacity] closed loop, {opts.concurrency} clients, {opts.capacity_s:g} s ...")
        capacity = await closed_loop(callers, len(bodies), pid, opts)
        if capacity["requests_per_s"] <= 0:
            raise RuntimeError(f"no request succeeded while measuring capacity: {capacity}")
        rate = opts.rate_factor * capacity["requests_per_s"]
        say(f"[capacity] {capacity['requests_per_s']:.1f} req/s; soak at {rate:.1f} req/s for "
            f"{opts.duration_s:g} s ...")
        before = await server_counters(url)
        marks["soak_start"] = rss_mb(pid)
        soak_t0 = time.perf_counter() - t0
        cpu0, own0, wall0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
        soak = await open_loop(callers, len(bodies), rate, opts)
        say(f"[soak] done; the last answer {soak['drained_s']:.1f} s after the last send")
        cpu = (cpu_seconds(pid) - cpu0, time.process_time() - own0, time.perf_counter() - wall0)
        marks["end"] = rss_mb(pid)  # every request answered (or given up on)
        await asyncio.sleep(2.0)
        marks["after_drain"] = rss_mb(pid)
        after = await server_counters(url)
        http.close()
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    tallies = soak.pop("tallies")
    ok = sum(t.counts["ok"] for t in tallies.values())
    return {"capacity": capacity,
            "soak": {**soak, "outcomes": {t: tallies[t].summary() for t in tallies},
                     "ok_per_s": ok / opts.duration_s,
                     "ok_per_server_cpu_s": ok / cpu[0] if cpu[0] else None,
                     "server_cpu_cores": cpu[0] / cpu[2], "driver_cpu_cores": cpu[1] / cpu[2],
                     "server_counters": {k: after.get(k, 0) - before.get(k, 0)
                                         for k in sorted(after)}},
            "rss": rss_summary(rss, marks, soak_t0, opts)}


def rss_summary(samples: list[tuple[float, float]], marks: dict[str, float], soak_t0: float,
                opts: Options) -> dict[str, Any]:
    """Memory over the soak. The RSS swings by tens of MB with the shapes of the batches in the
    model, so flatness compares medians of windows, not two samples: baseline = the median
    over [warm-up, warm-up + window), end = the median over the soak's last window; flat: end -
    baseline <= the smaller of rss_growth_pct of the baseline and rss_growth_mb."""
    soak = [(t - soak_t0, mb) for t, mb in samples if t >= soak_t0]
    during = [(t, mb) for t, mb in soak if t <= opts.duration_s] or soak
    w, warm = opts.rss_window, opts.rss_warmup
    first = [mb for t, mb in during if warm <= t < warm + w] or [during[0][1]]
    last = [mb for t, mb in during if t >= opts.duration_s - w] or [during[-1][1]]
    baseline, end = float(np.median(first)), float(np.median(last))
    limit = min(opts.rss_growth_pct / 100 * baseline, opts.rss_growth_mb)
    after_warmup = [(t, mb) for t, mb in during if t >= warm]
    slope = None
    if len(after_warmup) >= 3:
        t, mb = np.asarray(after_warmup).T
        slope = float(np.polyfit(t, mb, 1)[0] * 60)
    return {"idle_mb": marks["idle"], "soak_start_mb": marks["soak_start"],
            "end_of_soak_mb": marks["end"], "max_mb": max(mb for _, mb in soak),
            "after_drain_mb": marks["after_drain"],
            "baseline_mb": baseline, "baseline_window_s": [warm, warm + w],
            "end_mb": end, "end_window_s": [opts.duration_s - w, opts.duration_s],
            "growth_mb": end - baseline, "limit_mb": limit, "flat": end - baseline <= limit,
            "slope_mb_per_min": slope, "samples": [[round(t, 2), round(mb, 1)] for t, mb in soak]}


# ---------------------------------------------------------------- one run


_T0 = time.perf_counter()


def say(message: str) -> None:
    """A progress line, with the seconds since this module was loaded."""
    print(f"{time.perf_counter() - _T0:6.1f} s  {message}", flush=True)


def resolve_model(path: Path | None) -> Path:
    if path is not None:
        return path
    from tokenrm.training.demo import demo_checkpoint

    return demo_checkpoint()


def run(model_path: Path, opts: Options) -> dict[str, Any]:
    """The whole run on one checkpoint: pool, expected rewards, server, capacity, soak, checks."""
    say(f"[pool] {opts.requests} requests, expected rewards from the direct forward ...")
    started = time.perf_counter()
    model = RewardModel.load(model_path, trace=False)
    info = model.info
    requests = make_requests(info.vocab_size, info.max_len, opts)
    expected = expected_rewards(model, requests)
    del model
    bodies = [to_bodies(rows, len(rows))[0] for rows in requests]
    pool_s = time.perf_counter() - started
    # float32: the expected rewards are float32's (dtype auto may serve bf16 on this CPU)
    env = {"TOKENRM_REQUEST_TIMEOUT_S": f"{opts.deadline_s:g}", "TOKENRM_DTYPE": "float32",
           **opts.server_env}
    say("[server] starting ...")
    with serve(model_path, env=env, timeout_s=180) as server:
        measured = uvloop.run(drive(server.url, server.grpc_target, server.process.pid, bodies,
                                    expected, opts))
        say("[server] stopping ...")
    say("[server] stopped")
    items = [len(rows) for rows in requests]
    result = {"config": {**asdict(opts), "model": str(model_path), "max_len": info.max_len,
                         "vocab_size": info.vocab_size, "server_env": env,
                         "cpus": os.cpu_count(), "rss_warmup_s": opts.rss_warmup},
              "pool": {"requests": len(requests), "items_mean": float(np.mean(items)),
                       "tokens_mean": float(np.mean([b.tokens for b in bodies])),
                       "expected_s": pool_s},
              **measured}
    result["checks"], result["warnings"] = checks(result)
    result["passed"] = all(c["ok"] for c in result["checks"].values())
    return result


def totals(outcomes: dict[str, dict[str, Any]]) -> dict[str, int]:
    keys = ("planned", "sent", "not_sent", *OUTCOMES, "refused_without_hint")
    return {k: sum(o[k] for o in outcomes.values()) for k in keys}


def checks(result: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """What must hold (name -> value, ok) and what deserves a look but does not fail."""
    soak = totals(result["soak"]["outcomes"])
    capacity = totals(result["capacity"]["outcomes"])
    out: dict[str, dict[str, Any]] = {}
    for k in MUST_BE_ZERO:
        n = soak[k] + capacity[k]
        out[f"{k} == 0"] = {"value": n, "ok": n == 0}
    share = result["config"]["max_expired_share"]
    for t, o in result["soak"]["outcomes"].items():
        accepted = o["ok"] + o["expired"]
        out[f"{t}: expired <= {share:.1%} of accepted"] = {
            "value": f"{o['expired']} of {accepted}",
            "ok": o["expired"] <= share * accepted}
    for t, o in result["soak"]["outcomes"].items():
        out[f"{t}: some ok"] = {"value": o["ok"], "ok": o["ok"] > 0}
    rss = result["rss"]
    out["rss flat"] = {"value": f"{rss['growth_mb']:+.1f} MB (limit {rss['limit_mb']:.1f})",
                       "ok": rss["flat"]}
    warnings = []
    if soak["refused"] == 0:
        warnings.append("nothing was refused: the soak did not overload the server (capacity "
                        "under-measured?)")
    if soak["expired"] + capacity["expired"]:
        warnings.append(f"{soak['expired'] + capacity['expired']} requests were accepted, "
                        "then ended unscored at their deadline (neither ok nor refused; over "
                        "HTTP a 503)")
    if soak["not_sent"]:
        bound = result["config"]["max_outstanding"]
        warnings.append(f"{soak['not_sent']} requests not sent: {bound} were in flight")
    if soak["refused_without_hint"]:
        warnings.append(f"{soak['refused_without_hint']} refusals without Retry-After / "
                        "retry-after-ms")
    return out, warnings


# ---------------------------------------------------------------- report


def _ms(p: dict[str, float | None]) -> str:
    if p["p50"] is None:
        return "n/a"
    return f"{p['p50']:.0f} / {p['p99']:.0f} / {p['max']:.0f}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _window(w: Sequence[float]) -> str:
    return f"{w[0]:g}-{w[1]:g} s"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(result: dict[str, Any]) -> str:
    c, cap, soak, rss = result["config"], result["capacity"], result["soak"], result["rss"]
    pool = result["pool"]
    env = ", ".join(f"{k}={v}" for k, v in c["server_env"].items())
    lines = [
        "# tokenrm load and soak", "",
        f"model `{c['model']}` (max_len {c['max_len']}, vocab {c['vocab_size']}); "
        f"{pool['requests']} distinct requests of {c['min_items']}-{c['max_items']} token items "
        f"(mean {pool['items_mean']:.1f} items, {pool['tokens_mean']:.0f} tokens), rewards "
        f"checked against the direct forward (each item alone, eager) to {c['tolerance']:g}; "
        f"server env {env}; {c['cpus']} CPUs shared by the server and this driver.", "",
        f"- capacity: closed loop, {cap['clients']} clients (half HTTP, half gRPC unary), "
        f"{cap['window_s']:g} s: **{cap['requests_per_s']:.1f} req/s** ("
        + ", ".join(f"{t} {r:.1f}" for t, r in cap["per_transport"].items())
        + f"); server CPU {cap['server_cpu_cores']:.2f} cores, "
        f"{_num(cap['ok_per_server_cpu_s'])} ok requests per server CPU second",
        f"- soak: open loop at {c['rate_factor']:g} x capacity = **{soak['target_rate']:.1f} "
        f"req/s** for {c['duration_s']:g} s, HTTP and gRPC unary alternating, deadline "
        f"{c['deadline_s']:g} s (HTTP answers count until +{c['grace_s']:g} s), at most "
        f"{c['max_outstanding']} in flight; sent {soak['send_rate']:.1f} req/s; send lag p50 / "
        f"p99 / max {soak['send_lag_ms']['p50']:.1f} / {soak['send_lag_ms']['p99']:.1f} / "
        f"{soak['send_lag_ms']['max']:.1f} ms; last answer {soak['drained_s']:.2f} s after the "
        f"last send; CPU cores used: server {soak['server_cpu_cores']:.2f}, driver "
        f"{soak['driver_cpu_cores']:.2f}",
        f"- goodput in the soak: {soak['ok_per_s']:.1f} ok req/s "
        f"({soak['ok_per_s'] / cap['requests_per_s']:.0%} of capacity), "
        f"{_num(soak['ok_per_server_cpu_s'])} ok requests per server CPU second", "",
        "| transport | planned | not sent | ok | refused | wrong | server error | timed out "
        "| expired | other | ok ms p50 / p99 / max | refused ms p50 / p99 / max "
        "| max reward diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    outcomes = soak["outcomes"]
    for t, o in outcomes.items():
        lines.append(_row([t, o["planned"], o["not_sent"], *(o[k] for k in OUTCOMES),
                           _ms(o["ok_ms"]), _ms(o["refused_ms"]), f"{o['max_abs_diff']:.2e}"]))
    tot = totals(outcomes)
    lines.append(_row(["**all**", tot["planned"], tot["not_sent"],
                       *(tot[k] for k in OUTCOMES), "", "", ""]))
    lines += [
        "", "| server RSS MB | idle | soak start | baseline (median) | end (median) "
        "| end of soak | max | after drain | growth | limit | slope MB/min | flat |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        _row(["VmRSS", f"{rss['idle_mb']:.1f}", f"{rss['soak_start_mb']:.1f}",
              f"{rss['baseline_mb']:.1f} ({_window(rss['baseline_window_s'])})",
              f"{rss['end_mb']:.1f} ({_window(rss['end_window_s'])})",
              f"{rss['end_of_soak_mb']:.1f}", f"{rss['max_mb']:.1f}",
              f"{rss['after_drain_mb']:.1f}", f"{rss['growth_mb']:+.1f}",
              f"{rss['limit_mb']:.1f}",
              "n/a" if rss["slope_mb_per_min"] is None else f"{rss['slope_mb_per_min']:+.1f}",
              "yes" if rss["flat"] else "**no**"]), ""]
    lines.append("- checks: " + "; ".join(
        f"{name} ({v['value']}): {'met' if v['ok'] else '**not met**'}"
        for name, v in result["checks"].items()))
    lines += [f"- warning: {w}" for w in result["warnings"]]
    server = soak["server_counters"]
    if server:
        lines.append("- the server's own counts over the soak (/metrics): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in server.items() if v))
    for t, o in outcomes.items():
        for outcome, examples in o["examples"].items():
            reasons = ", ".join(f"{n} x {r.split(': ', 1)[1]}" for r, n in o["reasons"].items()
                                if r.startswith(outcome + ": "))
            lines.append(f"- {t} {outcome}: {reasons}; e.g. {examples[0]}")
    lines += [
        "- outcomes: ok = a 200 whose rewards match; refused = 429 / RESOURCE_EXHAUSTED "
        "(overloaded); server error = 5xx, INTERNAL, UNKNOWN, UNAVAILABLE or a broken "
        "connection; timed out = not ended by the deadline + grace (a hang); expired = "
        "accepted, then ended unscored at its deadline: gRPC DEADLINE_EXCEEDED (sent by the "
        "server, or the client's timer by a hair first: both are in the reasons), HTTP 503 "
        "deadline_exceeded (the server's request timeout is set to the deadline). Latency is "
        "from sending to the answer.",
        "- RSS: VmRSS of the server process every second (times in s from the soak's start). "
        "It swings by tens of MB with the batch shapes in the model, so baseline and end are "
        "medians over windows, the baseline's after the queue and connections have filled up; "
        f"flat = end - baseline <= min({c['rss_growth_pct']:g}% of baseline, "
        f"{c['rss_growth_mb']:g} MB). The slope is a least-squares fit after the warm-up, for "
        "information.",
        f"- result: {'**passed**' if result['passed'] else '**FAILED**'}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry point


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Options()
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the demo model)")
    p.add_argument("--duration", type=float, default=d.duration_s, help="soak seconds")
    p.add_argument("--rate-factor", type=float, default=d.rate_factor,
                   help="soak rate as a multiple of the measured capacity")
    p.add_argument("--deadline-s", type=float, default=d.deadline_s,
                   help="per-request deadline (also the server's request timeout)")
    p.add_argument("--capacity-s", type=float, default=d.capacity_s,
                   help="closed-loop capacity window")
    p.add_argument("--concurrency", type=int, default=d.concurrency,
                   help="closed-loop clients while measuring capacity")
    p.add_argument("--max-outstanding", type=int, default=d.max_outstanding,
                   help="open loop: most requests in flight")
    p.add_argument("--grpc-channels", type=int, default=d.grpc_channels,
                   help="gRPC connections the calls are spread over")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--env", action="append", default=[], metavar="TOKENRM_X=V",
                   help="more server settings, e.g. TOKENRM_MAX_QUEUE_ITEMS=512")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for soak.json/.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    opts = Options(duration_s=args.duration, rate_factor=args.rate_factor,
                   deadline_s=args.deadline_s, capacity_s=args.capacity_s,
                   concurrency=args.concurrency, max_outstanding=args.max_outstanding,
                   grpc_channels=args.grpc_channels,
                   seed=args.seed,
                   server_env=dict(e.split("=", 1) for e in args.env))
    result = run(resolve_model(args.model), opts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    report = render(result)
    (args.out / "soak.md").write_text(report)
    print(report)
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
