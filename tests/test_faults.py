"""Faults around real `tokenrm serve` processes on 127.0.0.1: SIGTERM under a mixed HTTP and gRPC
load, signals with nothing in flight, a second signal during a drain, in-flight work that
outlasts the grace period, and model directories that are missing or corrupt.

(kill -9 and restart during a client's call and during a PPO run: tests/test_client.py and
tests/test_ppo.py. A drain of queued gRPC calls alone: tests/test_grpc_api.py.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.launcher import free_port
from tokenrm.training import synth

TIMEOUT = 30.0         # one call; a call that takes longer is a hang
START_TIMEOUT = 180.0  # a server process to become ready (the machine may be shared)
EXIT_TIMEOUT = 30.0    # a drain that should take a few seconds: longer is a hang
SERVICE = "tokenrm.v1.RewardService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
Answer = list[tuple[np.ndarray, list[int]]]  # per item: (rewards, token ids)


# ---------------------------------------------------------------- a server process we watch


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _spawn(model: Path, tmp_path: Path, env: dict[str, str] | None = None) -> Server:
    """`tokenrm serve --model MODEL` on free ports; its output goes to a file we can read."""
    port, grpc_port = free_port(), free_port()
    log = tmp_path / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "tokenrm.cli.main", "serve", "--model", str(model),
           "--port", str(port), "--grpc-port", str(grpc_port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    return Server(proc, port, grpc_port, log)


@contextmanager
def _serving(model: Path, tmp_path: Path, env: dict[str, str] | None = None
             ) -> Iterator[Server]:
    """A ready server; killed at the end if the test left it running."""
    server = _spawn(model, tmp_path, env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert server.proc.poll() is None, f"server exited:\n{server.output()[-4000:]}"
            try:
                if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready:\n{server.output()[-4000:]}"
            time.sleep(0.1)
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(timeout=60)


def _wait_queued(server: Server, rows: int, timeout: float = 60.0) -> None:
    """Until the engine holds at least `rows` rows waiting for a batch: accepted work."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/readyz", timeout=TIMEOUT).json()["queued"] < rows:
        assert time.monotonic() < deadline, f"fewer than {rows} rows ever queued"
        time.sleep(0.02)


# ---------------------------------------------------------------- requests and their outcomes


def _items(client: int, n: int) -> list[dict[str, Any]]:
    """n - 1 token-id items of 100 to 170 response tokens and one text item: work that fills
    forward passes (the tiny model's context is 192 tokens)."""
    rng = random.Random(client)
    items: list[dict[str, Any]] = [
        {"prompt_ids": [rng.randrange(3, 400) for _ in range(rng.randint(2, 20))],
         "response_ids": [rng.randrange(3, 400) for _ in range(rng.randint(100, 170))]}
        for _ in range(n - 1)]
    pair = next(iter(synth.generate(100 + client, 1)))
    items.append({"prompt": pair.prompt, "response": pair.edited})
    return items


def _proto(items: list[dict[str, Any]]) -> pb.ScoreRequest:
    return pb.ScoreRequest(items=[
        pb.Item(prompt=i.get("prompt"), response=i.get("response"),
                prompt_ids=i.get("prompt_ids"), response_ids=i.get("response_ids"))
        for i in items])


@dataclass
class Call:
    transport: str            # "http" or "grpc"
    client: int
    started: float            # time.monotonic()
    ended: float
    status: str               # "ok", "unavailable" (503 JSON / UNAVAILABLE), "refused" (no
                              # listener), "reset" (reset before any answer), "closed"
                              # (dropped without an answer), or what else
    answer: Answer | None = None
    detail: str = ""


def _caused_by_reset(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, ConnectionResetError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _http_call(client: httpx.Client, items: list[dict[str, Any]]
               ) -> tuple[str, Answer | None, str]:
    try:
        r = client.post("/score", json={"items": items})
    except httpx.ConnectError as exc:
        return "refused", None, repr(exc)
    except httpx.RemoteProtocolError as exc:
        return "closed", None, repr(exc)
    except httpx.ReadError as exc:
        return "reset" if _caused_by_reset(exc) else type(exc).__name__, None, repr(exc)
    except httpx.HTTPError as exc:
        return type(exc).__name__, None, repr(exc)
    if r.status_code == 200:
        return "ok", [(np.array(x["rewards"], dtype=np.float32), x["token_ids"])
                      for x in r.json()["results"]], ""
    try:
        code = r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if r.status_code == 503 and code == "unavailable" and r.headers.get("retry-after"):
        return "unavailable", None, r.text
    return f"http {r.status_code}", None, r.text[:300]


def _grpc_call(stub: pb_grpc.RewardServiceStub, request: pb.ScoreRequest
               ) -> tuple[str, Answer | None, str]:
    try:
        answer = stub.Score(request, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        code = exc.code()
        return ("unavailable" if code == UNAVAILABLE else f"grpc {code.name}"), None, \
            str(exc.details())
    if answer.HasField("error"):
        return f"error {answer.error.code}", None, answer.error.message
    return "ok", [(np.array(r.rewards, dtype=np.float32), list(r.token_ids))
                  for r in answer.results], ""


def _check_answer(answer: Answer, items: list[dict[str, Any]]) -> None:
    """One finite reward per response token of every item, in the items' order."""
    assert len(answer) == len(items)
    for (rewards, token_ids), item in zip(answer, items, strict=True):
        if "response_ids" in item:
            assert token_ids == item["response_ids"]
        assert len(rewards) == len(token_ids) > 0
        assert np.isfinite(rewards).all()


def _same_answer(a: Answer, b: Answer) -> None:
    """Equal up to float rounding (other rows may have shared the forward pass)."""
    for (ra, ta), (rb, tb) in zip(a, b, strict=True):
        assert ta == tb
        np.testing.assert_allclose(ra, rb, rtol=0, atol=1e-5)


def _one_call(server: Server, transport: str, client: int, items: list[dict[str, Any]],
              calls: list[Call]) -> threading.Thread:
    """A single call on its own thread; its outcome lands in `calls`."""
    def run() -> None:
        started = time.monotonic()
        if transport == "http":
            with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
                status, answer, detail = _http_call(c, items)
        else:
            with grpc.insecure_channel(server.grpc_target) as ch:
                status, answer, detail = _grpc_call(pb_grpc.RewardServiceStub(ch), _proto(items))
        calls.append(Call(transport, client, started, time.monotonic(), status, answer, detail))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _exit_status(server: Server, within: float = EXIT_TIMEOUT) -> int | None:
    """The process's exit status, or None if it is still running after `within` seconds."""
    try:
        return server.proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        return None


def _join(threads: list[threading.Thread], timeout: float = 2 * TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a call hung"


# ---------------------------------------------------------------- 1. SIGTERM under mixed load


CLIENTS = 8                # per transport
ITEMS = 8                  # per request: 16 x 8 = 128 rows, two forward passes of ~12k tokens
# The held round must stay queued while the drain is probed, and be answered well before the
# grace period ends, however slow a shared machine is: a long hold, a longer grace.
GRACE_S = 30.0
HELD_MS = 4000             # the batcher waits this long for a batch to fill: work stays queued


# New HTTP work during the drain is refused: a 503, or no listener. A new connection that the
# kernel had already completed when uvicorn closed its listener (~0.1 s after the signal) is
# reset before the server reads a byte of it: a refusal as well (seen in about one run in four;
# the server never saw the request, and every request it did take is checked to be answered).
NOT_TAKEN_HTTP = {"unavailable", "refused", "reset"}


def _looper(server: Server, transport: str, client: int, stop: threading.Event,
            calls: list[Call]) -> None:
    """Sends the same request in a loop until told to stop; after a refusal, every 50 ms."""
    items = _items(client if transport == "http" else CLIENTS + client, ITEMS)
    request = _proto(items)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http, \
            grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.RewardServiceStub(ch)
        while not stop.is_set():
            started = time.monotonic()
            status, answer, detail = (_http_call(http, items) if transport == "http"
                                      else _grpc_call(stub, request))
            if answer is not None:
                try:
                    _check_answer(answer, items)
                except AssertionError as exc:
                    status, detail = "wrong answer", repr(exc)
            calls.append(Call(transport, client, started, time.monotonic(), status, answer,
                              detail))
            if status != "ok":
                time.sleep(0.05)


def _poll_readyz(server: Server, stop: threading.Event,
                 seen: list[tuple[float, float, str]]) -> None:
    """GET /readyz on a fresh connection every 10 ms: (sent, answered, 'ready', 'not ready',
    'down' or what else)."""
    while not stop.is_set():
        at = time.monotonic()
        try:
            code = httpx.get(f"{server.url}/readyz", timeout=TIMEOUT).status_code
            state = {200: "ready", 503: "not ready"}.get(code, f"http {code}")
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            state = "down"
        except httpx.HTTPError as exc:
            state = repr(exc)
        seen.append((at, time.monotonic(), state))
        time.sleep(0.01)


def _slow_body_request(server: Server, body: bytes) -> socket.socket:
    """A POST /score whose headers and first bytes are sent now, the rest later: a request
    the server has taken in (its connection and cycle exist) whose work starts later."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    head = (f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[:10])
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the answer; the server closes the connection after it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_sigterm_under_mixed_load_finishes_accepted_work_refuses_new_and_exits_zero(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    """8 HTTP and 8 gRPC clients send 8-item requests in a loop (the batcher holds each round
    4 s, so 128 rows are queued at once). SIGTERM lands while a round is queued: every request
    the server had taken completes 200/OK with the rewards it gave before the signal; new work
    sent during the drain and after it is refused (HTTP: 503 with a JSON error, or no listener;
    gRPC: UNAVAILABLE), never a 500, a dropped connection or a hang; health turns NOT_SERVING,
    /readyz never turns ready again; the process exits 0 (how soon is printed, not asserted:
    a wall-clock figure; only a hang past the grace period fails)."""
    # One forward pass per round (no row budget or padding trade-off splits it), so that each
    # round's rows all wait together: a third batch for two workers would break the rounds up.
    env = {"TOKENRM_GRACE_S": str(GRACE_S), "TOKENRM_MAX_WAIT_MS": str(HELD_MS),
           "TOKENRM_MAX_BATCH_SIZE": "256", "TOKENRM_MAX_BATCH_TOKENS": "65536",
           "TOKENRM_BATCH_OVERHEAD_TOKENS": "1000000"}
    rows = 2 * CLIENTS * ITEMS
    late_items = _items(99, 2)
    with _serving(tiny_checkpoint, tmp_path, env) as server, \
            grpc.insecure_channel(server.grpc_target) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=2 * TIMEOUT)
        assert next(watch).status == SERVING
        late = _slow_body_request(server, json.dumps({"items": late_items}).encode())

        stop, polls_stop = threading.Event(), threading.Event()
        calls: list[Call] = []
        polls: list[tuple[float, float, str]] = []
        loopers = [threading.Thread(target=_looper, args=(server, t, i, stop, calls), daemon=True)
                   for t in ("http", "grpc") for i in range(CLIENTS)]
        poller = threading.Thread(target=_poll_readyz, args=(server, polls_stop, polls),
                                  daemon=True)
        for t in [*loopers, poller]:
            t.start()
        # The first round is the reference; the second, once all queued, is cut by the signal.
        deadline = time.monotonic() + 60
        while len({(c.transport, c.client) for c in calls}) < 2 * CLIENTS:
            assert time.monotonic() < deadline, "the first round was not answered"
            time.sleep(0.02)
        assert all(c.status == "ok" for c in calls), [c for c in calls if c.status != "ok"]
        _wait_queued(server, rows)

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # an open Watch would hold the gRPC server for its whole grace period
        # New work while the held round still waits: on the open channel, on a new one, and
        # over HTTP (whose listener closes within ~0.1 s of the signal).
        with grpc.insecure_channel(server.grpc_target) as fresh:
            during = [_grpc_call(pb_grpc.RewardServiceStub(c), _proto(late_items))
                      for c in (ch, fresh)]
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
            during.append(_http_call(http, late_items))
        still_held = not any(c.ended > signalled for c in calls)
        # Headers taken in before the signal, the body after the drain began: 503, with reason.
        late.sendall(json.dumps({"items": late_items}).encode()[10:])
        status, headers, body = _read_response(late)
        late.close()
        rc = _exit_status(server, GRACE_S + EXIT_TIMEOUT)
        exited = time.monotonic()
        time.sleep(0.3)  # the loopers see the closed ports too
        stop.set()
        polls_stop.set()
        _join([*loopers, poller])
        output = server.output()

    print(f"\nexit {exited - signalled:.1f} s after SIGTERM (grace {GRACE_S:g} s)")
    assert rc == 0, output[-3000:]
    assert status == 503, body
    error = json.loads(body)["error"]
    assert error["code"] == "unavailable" and "draining" in error["message"]
    assert int(headers["retry-after"]) >= 1
    assert still_held, "the held round was answered before the drain could be probed"
    assert [d[0] for d in during[:2]] == ["unavailable"] * 2, during
    assert all("draining" in d[2] for d in during[:2]), during
    assert during[2][0] in NOT_TAKEN_HTTP, during[2]

    held = [max((c for c in calls if (c.transport, c.client) == key and c.started < signalled),
                key=lambda c: c.started) for key in {(c.transport, c.client) for c in calls}]
    answered = min(c.ended for c in held)  # the held round's forward pass is over
    for transport in ("http", "grpc"):
        for client in range(CLIENTS):
            mine = sorted((c for c in calls if (c.transport, c.client) == (transport, client)),
                          key=lambda c: c.started)
            before = [c for c in mine if c.started < signalled]
            after = [c for c in mine if c.started >= signalled]
            # Taken in before the signal: all answered, the same as before the signal.
            assert [c.status for c in before] == ["ok"] * len(before), before
            assert len(before) >= 2 and before[-1].ended > signalled, \
                f"{transport} client {client}: no request was in flight at the signal"
            assert before[0].answer is not None
            for c in before[1:]:
                assert c.answer is not None
                _same_answer(c.answer, before[0].answer)
            # Sent after it (once its held request was answered): refused, each way the
            # transport can refuse; nothing else. Except that a gRPC call racing the gRPC
            # server's own stop (which follows the held round's answers) may end CANCELLED,
            # not UNAVAILABLE: in about a third of runs, one call at the very moment of the
            # stop (reported: the tokenrm client does not retry CANCELLED). Not asserted
            # either way, since no test can hit that moment at will.
            allowed = NOT_TAKEN_HTTP if transport == "http" else {"unavailable"}
            assert after, f"{transport} client {client} sent nothing after the signal"
            for c in after:
                if transport == "grpc" and c.status == "grpc CANCELLED" and \
                        c.started > answered - 0.1:
                    continue
                assert c.status in allowed, (
                    c.status, c.detail, f"sent {c.started - signalled:.3f} s after the signal, "
                    f"{c.started - answered:.3f} s after the last held answer")
    assert all(c.ended - c.started < TIMEOUT for c in calls)

    # /readyz: ready, then perhaps not ready (the listener closes within ~0.1 s), then down.
    order = {"ready": 0, "not ready": 1, "down": 2}
    states = [s for _, _, s in polls]
    assert set(states) <= set(order), set(states) - set(order)
    ranks = [order[s] for s in states]
    assert ranks == sorted(ranks), "/readyz answered ready after it had stopped"
    assert states[0] == "ready" and states[-1] == "down"
    assert all(s == "ready" for _, answered_at, s in polls if answered_at < signalled)
    assert "Traceback" not in output and "Exception in ASGI application" not in output


# ---------------------------------------------------------------- 2. idle signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_with_nothing_in_flight_exits_zero_quickly(tiny_checkpoint: Path,
                                                            tmp_path: Path,
                                                            sig: signal.Signals) -> None:
    """Nothing to wait for: the process exits 0 without waiting out its grace period (120 s;
    it must be gone within EXIT_TIMEOUT, 30 s, where about 1 s is usual)."""
    with _serving(tiny_checkpoint, tmp_path, {"TOKENRM_GRACE_S": "120"}) as server:
        with grpc.insecure_channel(server.grpc_target) as ch:  # both transports have been used
            assert _grpc_call(pb_grpc.RewardServiceStub(ch), _proto(_items(0, 2)))[0] == "ok"
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
            assert _http_call(client, _items(1, 2))[0] == "ok"
        server.proc.send_signal(sig)
        rc = _exit_status(server)
        output = server.output()
    assert rc is not None, f"still running {EXIT_TIMEOUT:g} s after {sig.name} (grace 120 s)"
    assert rc == 0, output[-3000:]
    assert "Finished server process" in output and "Traceback" not in output


# ---------------------------------------------------------------- 3. a second signal


def _held_round(server: Server, n: int, items: list[dict[str, Any]], calls: list[Call]
                ) -> list[threading.Thread]:
    """n HTTP and n gRPC calls of `items`, all queued in the engine when this returns."""
    threads = [_one_call(server, t, i, items, calls) for t in ("http", "grpc") for i in range(n)]
    _wait_queued(server, 2 * n * len(items))
    return threads


def _until_not_serving(server: Server) -> None:
    with grpc.insecure_channel(server.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + TIMEOUT
        while health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status != \
                NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_a_second_sigterm_during_a_drain_does_not_cut_it_short(tiny_checkpoint: Path,
                                                                 tmp_path: Path) -> None:
    """main.py drains on the first signal only; uvicorn ignores a repeated SIGTERM (only a
    second SIGINT forces an exit). So the queued calls still complete and the exit is 0. (The
    work is held 8 s, so that it is still queued when the second signal is checked; the grace
    period is 60 s, so that it is answered well within it.)"""
    items = _items(3, 4)
    calls: list[Call] = []
    with _serving(tiny_checkpoint, tmp_path, {"TOKENRM_MAX_WAIT_MS": "8000",
                                              "TOKENRM_GRACE_S": "60"}) as server:
        threads = _held_round(server, 3, items, calls)
        server.proc.send_signal(signal.SIGTERM)
        _until_not_serving(server)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert server.proc.poll() is None, "the second SIGTERM ended the drain"
        assert not calls, "a held call ended at the second SIGTERM"
        _join(threads)
        rc = _exit_status(server)
        output = server.output()
    assert rc == 0, output[-3000:]
    assert sorted(c.status for c in calls) == ["ok"] * 6, [(c.status, c.detail) for c in calls]
    for c in calls:
        assert c.answer is not None and c.ended > signalled
        _check_answer(c.answer, items)
        _same_answer(c.answer, calls[0].answer)  # type: ignore[arg-type]
    assert "Traceback" not in output


def test_sigint_during_a_drain_forces_a_clean_exit(tiny_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    """A second signal may abandon the queued work, but as a refusal or a closed connection,
    not a 500; and the process must end by exiting, not by crashing, and without waiting for
    the queued work: it is held 60 s, the grace period is 60 s, the exit must come within
    EXIT_TIMEOUT (30 s; about 1 s is usual)."""
    items = _items(4, 2)
    calls: list[Call] = []
    with _serving(tiny_checkpoint, tmp_path, {"TOKENRM_MAX_WAIT_MS": "60000",
                                              "TOKENRM_REQUEST_TIMEOUT_S": "120",
                                              "TOKENRM_GRACE_S": "60"}) as server:
        threads = _held_round(server, 8, items, calls)
        server.proc.send_signal(signal.SIGTERM)
        _until_not_serving(server)
        server.proc.send_signal(signal.SIGINT)
        rc = _exit_status(server)
        if rc is None:  # the calls below would wait out their own 30 s timeouts
            server.proc.kill()
        _join(threads)
        output = server.output()
    allowed = {"http": {"unavailable", "closed"}, "grpc": {"unavailable", "grpc CANCELLED"}}
    problems = [f"{c.transport}: {c.status} {c.detail[:80]}" for c in calls
                if c.status not in allowed[c.transport]]
    if rc is None or rc < 0:
        problems.append(f"exit status {rc} (None: still running {EXIT_TIMEOUT:g} s after "
                        f"SIGINT); output ends: {output[-600:]}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- 4. work beyond the grace


def test_work_that_outlasts_the_grace_period_is_refused_before_it_ends(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The batcher holds work 60 s; the grace period is 2 s. As RELIABILITY.md says, work still
    queued half a second before the grace period ends is answered 503 `unavailable` with
    Retry-After (HTTP) and UNAVAILABLE (gRPC), saying the server is shutting down: never cut
    off (a dropped connection, CANCELLED), never a 500; the process exits 0 without waiting for
    the work (within EXIT_TIMEOUT, 30 s; about 2.5 s is usual)."""
    items = _items(5, 2)
    calls: list[Call] = []
    with _serving(tiny_checkpoint, tmp_path, {"TOKENRM_MAX_WAIT_MS": "60000",
                                              "TOKENRM_GRACE_S": "2"}) as server:
        threads = _held_round(server, 2, items, calls)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rc = _exit_status(server)
        if rc is None:
            server.proc.kill()
        _join(threads)
        output = server.output()
    assert rc == 0, f"exit status {rc} (None: still running {EXIT_TIMEOUT:g} s after SIGTERM, " \
        f"grace 2 s); output ends: {output[-600:]}"
    assert sorted((c.transport, c.status) for c in calls) == \
        [("grpc", "unavailable")] * 2 + [("http", "unavailable")] * 2, \
        [(c.transport, c.status, c.detail[:80], f"{c.ended - signalled:.1f} s") for c in calls]
    for c in calls:
        assert "shutting down" in c.detail, c.detail
    assert "Traceback" not in output and "Exception in ASGI application" not in output


# ---------------------------------------------------------------- 5. broken model directories


def _weights(d: Path) -> Path:
    return d / "model.safetensors"


def _invalid_json(d: Path) -> None:
    (d / "config.json").write_text('{"architectures": ["LlamaForTokenClassification"], ')


def _truncated_weights(d: Path) -> None:
    data = _weights(d).read_bytes()
    _weights(d).write_bytes(data[:len(data) // 2])


def _random_weights(d: Path) -> None:
    _weights(d).write_bytes(random.Random(0).randbytes(_weights(d).stat().st_size))


def _no_tokenizer(d: Path) -> None:
    for f in d.glob("tokenizer*"):
        f.unlink()


def _edit_config(d: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))


def _seven_labels(config: dict[str, Any]) -> None:
    config["id2label"] = {str(i): f"grade_{i}" for i in range(7)}
    config["label2id"] = {f"grade_{i}": i for i in range(7)}


def _seven_labels_in_config(d: Path) -> None:
    """config.json says 7 labels; the weights' head still has 3."""
    _edit_config(d, _seven_labels)


def _seven_label_head(d: Path) -> None:
    """A consistent 7-label token classifier: a model, but not a reward model."""
    weights = load_file(_weights(d))
    hidden = weights["score.weight"].shape[1]
    weights["score.weight"] = torch.zeros(7, hidden)
    weights["score.bias"] = torch.zeros(7)
    save_file(weights, _weights(d), metadata={"format": "pt"})
    _edit_config(d, _seven_labels)


def _causal_lm(d: Path) -> None:
    """A causal LM (a policy) with the same backbone and tokenizer: an LM head, no reward head."""
    weights = {k: v for k, v in load_file(_weights(d)).items() if not k.startswith("score.")}
    vocab, hidden = weights["model.embed_tokens.weight"].shape
    weights["lm_head.weight"] = torch.zeros(vocab, hidden)
    save_file(weights, _weights(d), metadata={"format": "pt"})

    def as_lm(config: dict[str, Any]) -> None:
        config["architectures"] = ["LlamaForCausalLM"]
        for key in ("id2label", "label2id", "tokenrm"):
            config.pop(key, None)

    _edit_config(d, as_lm)


def _empty(d: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()


def _a_file(d: Path) -> None:
    shutil.rmtree(d)
    d.write_text("not a checkpoint\n")


@dataclass(frozen=True)
class Broken:
    damage: Callable[[Path], None]
    says: str                  # what the one "tokenrm serve:" line must say (any case)
    marks: tuple[Any, ...] = field(default=())


BROKEN = {
    "invalid-config-json": Broken(_invalid_json, "not a valid json"),
    "truncated-weights": Broken(_truncated_weights, "deserializing"),
    "random-weights": Broken(_random_weights, "deserializing"),
    "no-tokenizer-files": Broken(_no_tokenizer, "tokenizer"),
    "seven-label-head": Broken(_seven_label_head, "1, 2 or 3 labels, not 7"),
    "seven-labels-in-config-only": Broken(_seven_labels_in_config, "1, 2 or 3 labels, not 7"),
    "empty-directory": Broken(_empty, "no config.json"),
    "a-file-not-a-directory": Broken(_a_file, "not a directory"),
    "causal-lm-without-reward-head": Broken(_causal_lm, "no trained weights for score"),
}


@pytest.mark.parametrize("case", [pytest.param(name, marks=b.marks) for name, b in BROKEN.items()])
def test_a_broken_model_directory_fails_to_start_with_a_clear_message(
        tiny_checkpoint: Path, tmp_path: Path, case: str) -> None:
    """The process exits non-zero within 60 s with one line naming the directory and the reason
    ('tokenrm serve: <dir>: ...', or argparse's 'tokenrm serve: error: argument --model: <dir>:
    ...') and no traceback, and meanwhile never answers /readyz or /score with 200."""
    broken = BROKEN[case]
    model = tmp_path / f"rm-{case}"
    shutil.copytree(tiny_checkpoint, model)
    broken.damage(model)
    server = _spawn(model, tmp_path)
    served: list[str] = []
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=server.url, timeout=2) as client:
            while server.proc.poll() is None and time.monotonic() < deadline and not served:
                for method, path, body in (("GET", "/readyz", None),
                                           ("POST", "/score", {"items": _items(7, 2)})):
                    try:
                        r = client.request(method, path, json=body)
                    except httpx.TransportError:
                        continue
                    if r.status_code == 200:
                        served.append(f"{method} {path}: 200 {r.text[:200]}")
                time.sleep(0.1)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        rc = server.proc.wait(timeout=60)
    output = server.output()
    assert not served, f"a broken model was served: {served}"
    assert rc not in (0, -signal.SIGKILL), f"exit status {rc}:\n{output[-3000:]}"
    lines = [line for line in output.splitlines() if line.startswith("tokenrm serve: ")]
    assert len(lines) == 1, output[-3000:]
    line = lines[0]  # refused where the flag is parsed, or where the checkpoint is read
    prefix = next((p for p in (f"tokenrm serve: {model}: ",
                               f"tokenrm serve: error: argument --model: {model}: ")
                   if line.startswith(p)), None)
    assert prefix is not None, line
    reason = line.removeprefix(prefix)
    assert broken.says.lower() in reason.lower(), line
    assert len(reason) < 300, line
    assert "Traceback" not in output, output[-3000:]
