"""Closed-loop load over HTTP, gRPC unary or gRPC streaming, measured over a window.

Each of `concurrency` clients sends one request, waits for its answer and sends the next, with
pre-encoded bodies, so that the load generator's own CPU (it shares the cores with the servers)
stays small: bare HTTP/1.1 (bench/wire.py) and gRPC with bytes in and out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import psutil
from wire import Connection, WireError

from tokenrm.proto import reward_pb2 as pb
from tokenrm.server.batching import padded_tokens

Row = tuple[list[int], int]  # model input ids, number of trailing response tokens
SCORE = "/tokenrm.v1.RewardService/Score"
SCORE_STREAM = "/tokenrm.v1.RewardService/ScoreStream"
TRANSPORTS = ("http", "grpc", "grpc-stream")


@dataclass(frozen=True)
class Body:
    """One request, pre-encoded for each transport."""

    json: bytes          # POST body
    proto: bytes         # serialized ScoreRequest
    tokens: int          # prompt + response tokens of all items
    padded: int          # tokens of its items padded to the longest: one forward per request
    path: str = "/score"  # where the JSON body goes


def to_bodies(rows: Sequence[Row], per_request: int) -> list[Body]:
    bodies = []
    for start in range(0, len(rows), per_request):
        chunk = rows[start:start + per_request]
        items = [{"prompt_ids": ids[:len(ids) - n], "response_ids": ids[len(ids) - n:]}
                 for ids, n in chunk]
        data = json.dumps({"items": items}, separators=(",", ":")).encode()
        proto = pb.ScoreRequest(items=[pb.Item(**it) for it in items]).SerializeToString()
        lengths = [len(ids) for ids, _ in chunk]
        bodies.append(Body(data, proto, sum(lengths), padded_tokens(lengths)))
    return bodies


@dataclass(frozen=True)
class Target:
    url: str             # http://127.0.0.1:<port>, also for /metrics
    grpc: str | None     # 127.0.0.1:<port>; None: the server has no gRPC
    pid: int             # the server process, whose CPU time is read from /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its live descendants (a Ray server's
    raylet, proxies and replicas)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


@dataclass(frozen=True)
class Sample:
    """One request as the client saw it."""

    start: float
    end: float
    body: Body
    ok: bool

    def share_in(self, start: float, end: float) -> float:
        """The part of this request's lifetime inside [start, end]."""
        overlap = min(self.end, end) - max(self.start, start)
        return max(0.0, overlap) / max(self.end - self.start, 1e-9)


# ---------------------------------------------------------------- one client per transport

Call = Callable[[Body], Awaitable[bool]]  # send one request, wait for it: did it succeed?


class _HttpClient:
    def __init__(self, target: Target, bodies: Sequence[Body]) -> None:
        self.conn = Connection.to(target.url)
        self.requests = {id(b): self.conn.request("POST", b.path, b.json) for b in bodies}

    async def call(self, body: Body) -> bool:
        try:
            return (await self.conn.send(self.requests[id(body)]))[0] == 200
        except (OSError, asyncio.IncompleteReadError, WireError):
            return False

    async def close(self) -> None:
        self.conn.close()


class _GrpcClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.score = channel.unary_unary(SCORE)  # bytes in, bytes out: no client-side parsing

    async def call(self, body: Body) -> bool:
        try:
            await self.score(body.proto, timeout=120)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def close(self) -> None:
        pass


class _GrpcStreamClient:
    """One stream per client, one request in flight on it (a closed loop, like the others)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stream = channel.stream_stream(SCORE_STREAM)()

    async def call(self, body: Body) -> bool:
        try:
            await self.stream.write(body.proto)
            answer = await self.stream.read()
        except grpc.aio.AioRpcError:
            return False
        return isinstance(answer, bytes) and not pb.ScoreResponse.FromString(answer).HasField(
            "error")

    async def close(self) -> None:
        await self.stream.done_writing()
        self.stream.cancel()


# ---------------------------------------------------------------- the load


async def metrics_text(url: str) -> str:
    """GET /metrics (Prometheus text format); empty if the server has none. A new connection
    each time: an idle one would be closed by the server's keep-alive timeout."""
    conn = Connection.to(url)
    try:
        status, body = await conn.send(conn.request("GET", "/metrics"))
    finally:
        conn.close()
    return body.decode() if status == 200 else ""


async def scrape(url: str) -> dict[str, float]:
    """The unlabelled counters of /metrics by name."""
    found = re.findall(r"^(tokenrm_\w+_total) ([0-9.eE+-]+)$", await metrics_text(url),
                       flags=re.MULTILINE)
    return {name: float(value) for name, value in found}


@dataclass
class _Load:
    """What one load run shares between its clients."""

    unanswered: set[int]                  # clients still waiting for their first response
    samples: list[Sample] = field(default_factory=list)
    stop_at: float = math.inf             # no client starts a request after this
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def answered(self, client: int) -> None:
        self.unanswered.discard(client)
        if not self.unanswered:
            self.settled.set()


async def _client(call: Call, bodies: Sequence[Body], client: int, first: int,
                  load: _Load) -> None:
    """Send requests back to back until `load.stop_at`, cycling through the bodies."""
    for i in itertools.count(first):
        started = time.perf_counter()
        if started >= load.stop_at:
            return
        body = bodies[i % len(bodies)]
        ok = await call(body)
        load.samples.append(Sample(started, time.perf_counter(), body, ok))
        load.answered(client)
        if not ok:
            await asyncio.sleep(0.05)


async def run_load(target: Target, transport: str, bodies: Sequence[Body], concurrency: int,
                   warmup: float, seconds: float, max_settle: float) -> dict[str, Any]:
    """`concurrency` clients over `transport`, measured over a window of `seconds`.

    The window opens after the warm-up, and not before every client has had a response (at
    most `max_settle` later): a window that opens while the first requests are still queued
    would measure the ramp-up, not the steady state.
    """
    async with contextlib.AsyncExitStack() as stack:
        if transport == "http":
            clients: list[Any] = [_HttpClient(target, bodies) for _ in range(concurrency)]
        else:
            assert target.grpc is not None, "this server has no gRPC port"
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(target.grpc))
            kind = _GrpcClient if transport == "grpc" else _GrpcStreamClient
            clients = [kind(channel) for _ in range(concurrency)]
        load = _Load(unanswered=set(range(concurrency)))
        started = time.perf_counter()
        spread = max(1, len(bodies) // concurrency)  # each client starts elsewhere
        tasks = [asyncio.create_task(_client(c.call, bodies, i, i * spread, load))
                 for i, c in enumerate(clients)]
        await asyncio.sleep(warmup)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.settled.wait(), max_settle)
        window_start = time.perf_counter()
        cpu_before = cpu_seconds(target.pid)
        load.stop_at = window_end = window_start + seconds
        before = asyncio.create_task(scrape(target.url))  # a blocked server answers it late
        await asyncio.sleep(seconds)
        cpu = cpu_seconds(target.pid) - cpu_before
        after = await scrape(target.url)
        await asyncio.gather(*tasks)
        for c in clients:
            await c.close()
    result = summarize(load.samples, window_start, window_end, await before, after)
    done = result["requests_per_s"] * seconds
    return {**result, "warmup_s": window_start - started, "server_cpu_s": cpu,
            "server_cpu_ms_per_request": 1000 * cpu / done if done else None}


def summarize(samples: Sequence[Sample], start: float, end: float, before: dict[str, float],
              after: dict[str, float]) -> dict[str, Any]:
    """Throughput, latency and padding of the window [start, end].

    Tokens/s counts each successful request's tokens in proportion to the part of its lifetime
    inside the window: with latencies of seconds, counting only the requests that complete in
    the window would swing with the few that happen to finish inside it.
    """
    ok = [s for s in samples if s.ok]
    done = [s for s in ok if start <= s.end <= end]
    latencies = np.array([s.end - s.start for s in done] or [np.nan]) * 1000
    tokens = after.get("tokenrm_tokens_total", 0) - before.get("tokenrm_tokens_total", 0)
    padded = (after.get("tokenrm_padded_tokens_total", 0)
              - before.get("tokenrm_padded_tokens_total", 0))
    elapsed = end - start
    return {"tokens_per_s": sum(s.body.tokens * s.share_in(start, end) for s in ok) / elapsed,
            "completed_tokens_per_s": sum(s.body.tokens for s in done) / elapsed,
            "requests_per_s": len(done) / elapsed,
            "errors": sum(not s.ok and start <= s.end <= end for s in samples),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "padding_ratio": padded / tokens if tokens else None,
            "request_padding_ratio": sum(s.body.padded for s in done)
            / max(1, sum(s.body.tokens for s in done))}


async def sequential_latency(url: str, bodies: Sequence[Body], n: int) -> float:
    """p50 (ms) of `n` HTTP requests sent one after another, after a short warm-up."""
    conn = Connection.to(url)
    requests = [conn.request("POST", "/score", b.json) for b in bodies]
    latencies = []
    for i in range(-5, n):
        started = time.perf_counter()
        status, body = await conn.send(requests[i % len(bodies)])
        if status != 200:
            raise RuntimeError(f"POST /score answered {status}: {body[:500]!r}")
        if i >= 0:
            latencies.append(time.perf_counter() - started)
    conn.close()
    return float(np.percentile(latencies, 50) * 1000)
