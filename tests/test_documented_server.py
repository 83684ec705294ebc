"""Documented server behaviour that had no test (issue 19, item 5), against real `tokenrm serve`
processes on 127.0.0.1: settings from TOKENRM_* variables, a sequence-classification
checkpoint end to end, /readyz while starting, refusals before the body is read, and the
default bind to 127.0.0.1 alone (checked from 127.0.0.2 and ::1)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from tokenrm.core.encoding import encode
from tokenrm.core.reward_rule import token_rewards
from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.app import create_app
from tokenrm.server.http_headers import BoundedHeadersProtocol
from tokenrm.server.launcher import Running, free_port, serve, start, stop
from tokenrm.server.live import load_model, serving
from tokenrm.server.model import RewardModel
from tokenrm.server.settings import Settings

TIMEOUT = 30.0          # one request; only catches a hang
START_TIMEOUT = 180.0   # a server process to become ready (the machine may be shared)
PROMPT = "Facts: Ana lives in Lima. Ana is 30 years old. Question: Describe Ana."
RESPONSE = "Ana lives in Oslo. Ana is 30 years old."
TOKEN_ITEM = {"prompt_ids": [5, 6, 7], "response_ids": [40, 41, 42, 43, 44]}


@contextlib.contextmanager
def _serving(checkpoint: Path, env: dict[str, str]) -> Iterator[Running]:
    """`tokenrm serve` as a user starts it: no --host, no TOKENRM_HOST in its environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TOKENRM_HOST", raising=False)
        with serve(checkpoint, env=env, timeout_s=START_TIMEOUT) as running:
            yield running


@pytest.fixture(scope="module")
def half(tiny_checkpoint: Path) -> Iterator[Running]:
    """float16, one forward thread of one torch thread, no TorchScript trace."""
    with _serving(tiny_checkpoint, {"TOKENRM_DTYPE": "float16", "TOKENRM_WORKERS": "1",
                                    "TOKENRM_THREADS": "1", "TOKENRM_TRACE": "false"}) as s:
        yield s


@pytest.fixture(scope="module")
def expiring(tiny_checkpoint: Path) -> Iterator[Running]:
    """Requests may take 0.5 s; the batcher waits 20 s for a batch to fill."""
    with _serving(tiny_checkpoint, {"TOKENRM_REQUEST_TIMEOUT_S": "0.5",
                                    "TOKENRM_MAX_WAIT_MS": "20000"}) as s:
        yield s


def _direct_token_rewards(checkpoint: Path, ids: list[int], n: int) -> np.ndarray:
    model = AutoModelForTokenClassification.from_pretrained(checkpoint).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits
    return token_rewards(logits, model.config.id2label)[0, -n:].numpy()


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.split(" ", 1)[0] == name)


# ---------------------------------------------------------------- 4. settings from the environment


def test_dtype_from_the_environment_is_the_served_dtype(half: Running,
                                                        tiny_checkpoint: Path) -> None:
    info = httpx.get(f"{half.url}/v1/model", timeout=TIMEOUT).json()
    assert (info["dtype"], info["device"]) == ("float16", "cpu")
    with grpc.insecure_channel(half.grpc_target) as channel:
        assert pb_grpc.RewardServiceStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=TIMEOUT).dtype == "float16"
    r = httpx.post(f"{half.url}/score", json={"items": [TOKEN_ITEM]}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    got = np.array(r.json()["results"][0]["rewards"])
    want = _direct_token_rewards(tiny_checkpoint, [5, 6, 7, 40, 41, 42, 43, 44], 5)
    # Computed in float16: float32's rewards up to float16's rounding, and not bit for bit.
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)
    assert not np.array_equal(got.astype(np.float32), want)


def test_workers_threads_and_trace_from_the_environment_reach_the_engine(
        tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the three shows in /v1/model or the log, so they are checked on what `tokenrm
    serve` builds from the environment: Settings(), load_model, serving."""
    monkeypatch.setenv("TOKENRM_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("TOKENRM_BATCH_OVERHEAD_TOKENS", "0")  # no calibration forward passes

    async def workers(settings: Settings, model: RewardModel) -> int:
        async with serving(settings, model) as state:
            return state.service.engine.limits.workers

    def torch_threads_on_a_new_thread() -> int:  # the forward passes run on worker threads
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join(TIMEOUT)
        return seen[0]

    before = torch.get_num_threads()
    try:
        for n_workers, n_threads, trace in ((3, 1, "false"), (1, 2, "true"), (2, 1, None)):
            monkeypatch.setenv("TOKENRM_WORKERS", str(n_workers))
            monkeypatch.setenv("TOKENRM_THREADS", str(n_threads))
            if trace is None:  # unset: traced on the CPU
                monkeypatch.delenv("TOKENRM_TRACE")
            else:
                monkeypatch.setenv("TOKENRM_TRACE", trace)
            settings = Settings()
            model = load_model(settings)
            assert model.info.traced is (trace != "false")
            assert torch.get_num_threads() == torch_threads_on_a_new_thread() == n_threads
            assert asyncio.run(workers(settings, model)) == n_workers
    finally:
        torch.set_num_threads(before)


def test_request_timeout_from_the_environment_expires_queued_work(expiring: Running) -> None:
    """The batcher would hold the request 20 s; TOKENRM_REQUEST_TIMEOUT_S=0.5 ends it first,
    with the documented answer, and nothing is computed for it."""
    r = httpx.post(f"{expiring.url}/score", json={"items": [TOKEN_ITEM]}, timeout=TIMEOUT)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert "0.5 s" in r.json()["error"]["message"]
    with grpc.insecure_channel(expiring.grpc_target) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        request = pb.ScoreRequest(items=[pb.Item(**TOKEN_ITEM)])
        for deadline in (None, TIMEOUT):  # the caller's longer deadline does not extend it
            with pytest.raises(grpc.RpcError) as expired:
                stub.Score(request, timeout=deadline)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            trailing = dict(expired.value.trailing_metadata() or ())
            assert trailing["tokenrm-error-code"] == "deadline_exceeded"
    assert _metric(expiring.url, "tokenrm_tokens_total") == 0


def test_a_503_deadline_exceeded_carries_retry_after(expiring: Running) -> None:
    r = httpx.post(f"{expiring.url}/score", json={"items": [TOKEN_ITEM]}, timeout=TIMEOUT)
    assert r.status_code == 503
    assert "retry-after" in r.headers


# ---------------------------------------------------------------- 5. a sequence-classification RM


def test_a_pairwise_checkpoint_is_served_with_its_score_on_the_last_token(
        pairwise_checkpoint: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(pairwise_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(pairwise_checkpoint)
    text = encode(tokenizer, PROMPT, RESPONSE)
    rows = [(text.input_ids, len(text.response_ids)),
            (TOKEN_ITEM["prompt_ids"] + TOKEN_ITEM["response_ids"], 5),
            ([5, 6, 7, 40], 1)]  # a one-token response: the score is its only reward
    with torch.inference_mode():
        scores = [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids, _ in rows]
    items = [{"prompt": PROMPT, "response": RESPONSE}, TOKEN_ITEM,
             {"prompt_ids": [5, 6, 7], "response_ids": [40]}]

    with _serving(pairwise_checkpoint, {}) as server, \
            grpc.insecure_channel(server.grpc_target) as channel:
        info = httpx.get(f"{server.url}/v1/model", timeout=TIMEOUT).json()
        r = httpx.post(f"{server.url}/score", json={"items": items}, timeout=TIMEOUT)
        stub = pb_grpc.RewardServiceStub(channel)
        grpc_info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
        over_grpc = stub.Score(pb.ScoreRequest(items=[pb.Item(**i) for i in items]),
                               timeout=TIMEOUT)
    assert (info["kind"], info["labels"], info["reward_rule"]) == ("sequence", ["score"], "logit")
    assert grpc_info.kind == "sequence"
    assert r.status_code == 200, r.text
    for result, grpc_result, (_, n), score in zip(r.json()["results"], over_grpc.results, rows,
                                                  scores, strict=True):
        rewards = np.array(result["rewards"], dtype=np.float32)
        assert len(rewards) == n and not rewards[:-1].any()
        assert rewards[-1] == pytest.approx(score, abs=1e-5) and rewards[-1] != 0
        assert result["total"] == pytest.approx(score, abs=1e-5)
        assert np.array_equal(np.array(grpc_result.rewards, dtype=np.float32), rewards)


# ---------------------------------------------------------------- 6. /readyz while starting


def _readyz(port: int) -> tuple[Any, ...]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=TIMEOUT)
    except httpx.TransportError:
        return ("down",)
    return r.status_code, r.headers.get("retry-after"), r.json().get("status")


def _health(grpc_port: int) -> str:
    """The gRPC health status, or 'down' while nothing answers (a fresh channel each time:
    a channel that failed to connect backs off before it tries again)."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return "down"
            raise
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def test_readyz_is_not_ready_until_the_model_is_loaded_then_200(tiny_checkpoint: Path) -> None:
    """Polled from before the process starts: /readyz answers nothing (no listener) or 503
    with Retry-After, then 200, and at its first 200 a /score is answered at once; gRPC health
    likewise (nothing, or NOT_SERVING, then SERVING). Never ready, then not ready again."""
    port, grpc_port = free_port(), free_port()
    seen: list[tuple[tuple[Any, ...], str]] = []
    first_score: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            http = _readyz(port)
            if http[0] == 200 and not first_score:
                first_score.append(httpx.post(f"http://127.0.0.1:{port}/score", timeout=TIMEOUT,
                                              json={"items": [TOKEN_ITEM]}).status_code)
            seen.append((http, _health(grpc_port)))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc = None
    try:
        proc = start(tiny_checkpoint, port, grpc_port, timeout_s=START_TIMEOUT)
        deadline = time.monotonic() + TIMEOUT  # a few polls of the ready server
        while sum(s == ((200, None, "ready"), "SERVING") for s in seen) < 3:
            assert time.monotonic() < deadline, seen[-5:]
            time.sleep(0.05)
    finally:
        done.set()
        watcher.join(TIMEOUT)
        if proc is not None:
            stop(proc)

    http, health = [h for h, _ in seen], [g for _, g in seen]
    assert http[0] == ("down",), "the poll did not start before the server listened"
    assert first_score == [200]
    ready_at = http.index((200, None, "ready"))
    assert all(h == ("down",) or h == (503, "1", "not ready") for h in http[:ready_at]), http
    assert all(h == (200, None, "ready") for h in http[ready_at:]), http
    serving_at = health.index("SERVING")
    assert set(health[:serving_at]) <= {"down", "NOT_SERVING"}, health
    assert set(health[serving_at:]) == {"SERVING"}, health


# ---------------------------------------------------------------- 7. refused before the body


def _raw_answer(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `head` (a request line and headers, no body) and read the answer; the socket's
    timeout fails the test if the server waits for the body instead of answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        top, _, body = data.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", "0")) and (chunk := sock.recv(65536)):
            body += chunk
    return int(lines[0].split()[1]), headers, body


def _post_head(length: int) -> bytes:
    return (f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_an_over_limit_content_length_is_refused_before_the_body_is_sent(half: Running) -> None:
    limit = 8 * 1024 * 1024  # TOKENRM_MAX_BODY_BYTES's default
    status, _, body = _raw_answer(int(half.url.rsplit(":", 1)[1]), _post_head(limit + 1))
    assert status == 413, body
    assert b'"code":"payload_too_large"' in body and str(limit).encode() in body


@contextlib.contextmanager
def _in_process(settings: Settings, model: RewardModel) -> Iterator[Any]:
    """The app of `tokenrm serve` under uvicorn, as serve.run configures it, on a thread of
    this process (so that the test can reach the engine); yields the app."""
    app = create_app(settings, model)
    server = _Uvicorn(uvicorn.Config(
        app, host="127.0.0.1", port=settings.http_port, http=BoundedHeadersProtocol,
        log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield app
    finally:  # queued work refused (503) first, as a second Ctrl-C does: then a quick exit
        assert server.loop is not None
        server.loop.call_soon_threadsafe(app.state.tokenrm.service.engine.abandon_waiting)
        server.should_exit = True
        thread.join(TIMEOUT)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, keeping its event loop (to reach the engine on it)."""

    loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)


def test_a_queue_past_the_admission_point_is_refused_before_the_body_is_sent(
        tiny_checkpoint: Path) -> None:
    """RELIABILITY.md: 'A request is also refused before its body is parsed when the queue
    alone is past that point' (work ahead of it over half its time). One 151-token request is
    held in the queue (the batcher waits 60 s to fill a batch) and the engine's measured speed
    is set to 1 s per token, as a much slower model would have measured: 151 s of work ahead,
    more than half of 30 s. A request whose body never comes is answered 429 at once."""
    port = free_port()
    settings = Settings(model=tiny_checkpoint, http_port=port, grpc_port=0, max_wait_ms=60_000,
                        batch_overhead_tokens=0, request_timeout_s=30)
    url = f"http://127.0.0.1:{port}"
    held = {"prompt_ids": [5], "response_ids": [40 + i % 300 for i in range(150)]}
    with _in_process(settings, RewardModel.load(tiny_checkpoint, trace=False)) as app:
        holder = threading.Thread(target=lambda: _ignore_errors(httpx.post, f"{url}/score",
                                                                json={"items": [held]},
                                                                timeout=TIMEOUT), daemon=True)
        holder.start()
        deadline = time.monotonic() + TIMEOUT
        while httpx.get(f"{url}/readyz", timeout=TIMEOUT).json()["queued"] < 1:
            assert time.monotonic() < deadline, "the held request was never queued"
            time.sleep(0.02)
        app.state.tokenrm.service.engine.speed.seconds_per_token = 1.0
        status, headers, body = _raw_answer(port, _post_head(1000))
    holder.join(TIMEOUT)
    assert status == 429, body
    assert b'"code":"overloaded"' in body and b"s of work" in body
    assert int(headers["retry-after"]) >= 1


def _ignore_errors(call: Any, *args: Any, **kwargs: Any) -> None:
    with contextlib.suppress(Exception):  # the held request ends with the server
        call(*args, **kwargs)


# ---------------------------------------------------------------- 9. bound to 127.0.0.1 alone


def _reachable(family: socket.AddressFamily, address: str, port: int) -> bool:
    try:
        with socket.socket(family) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect((address, port))
    except ConnectionRefusedError:
        return False
    return True


def _usable(family: socket.AddressFamily, address: str) -> bool:
    """Can this machine listen on `address` and connect to it?"""
    try:
        with socket.socket(family) as listener:
            listener.bind((address, 0))
            listener.listen()
            return _reachable(family, address, listener.getsockname()[1])
    except OSError:
        return False


def test_the_default_bind_is_127_0_0_1_alone(half: Running) -> None:
    """Linux routes all of 127/8 to the loopback interface: a server listening on every
    interface (0.0.0.0) would accept on 127.0.0.2 as well, one bound to 127.0.0.1 does not
    (likewise ::1 for one bound to ::). tests/test_auth_exposure.py checks the machine's
    non-loopback addresses, and skips where there are none."""
    ports = [int(half.url.rsplit(":", 1)[1]), int(half.grpc_target.rsplit(":", 1)[1])]
    assert "--host" not in half.process.args
    others = [(socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")]
    assert _usable(*others[0]), "127.0.0.2 is not usable here: the check cannot run"
    for port in ports:
        assert _reachable(socket.AF_INET, "127.0.0.1", port)
        for family, address in others:
            if _usable(family, address):
                assert not _reachable(family, address, port), (address, port)

