"""tokenrm.client against real `tokenrm serve` processes on 127.0.0.1, over real sockets: the same
results as the server's own answers, splitting and order, policy alignment, retries (through a
faulty proxy and an overloaded server), a server restarted mid-call, input errors, deadlines,
several endpoints, malformed answers, API keys and an import without torch."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from tests.faulty_proxy import FaultyProxy
from tokenrm.client import (
    AsyncRewardClient,
    AuthenticationError,
    DeadlineError,
    InputError,
    Item,
    ItemScore,
    ResultError,
    RetryPolicy,
    RewardClient,
    ServerError,
)
from tokenrm.server.launcher import Running, free_port, serve, start, stop
from tokenrm.training import synth

TIMEOUT = 30.0
START_TIMEOUT = 180.0  # a server process to become ready: only a hang (the machine may be shared)
SCHEMES = ["http", "grpc"]
FAST_RETRY = RetryPolicy(initial_s=0.05, max_s=0.5)


# ---------------------------------------------------------------- items and expected answers


def _words(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def mixed_items(seed: int = 0) -> list[Item]:
    """Text items of several lengths (one with non-ASCII characters) and token-id items of 1 to
    150 response tokens, shuffled."""
    pairs = list(synth.generate(11 + seed, 3))
    text = [Item.text(p.prompt, r) for p in pairs for r in (p.rejected, p.edited)]
    text.append(Item.text("Facts: Ana lives in Lima.", " ".join(p.edited for p in pairs)))
    text.append(Item.text("Where?", "Köln. Łódź."))
    rng = random.Random(seed)
    ids = [Item.tokens([rng.randrange(3, 400) for _ in range(rng.randint(0, 30))],
                       [rng.randrange(3, 400) for _ in range(n)]) for n in (1, 7, 60, 150)]
    items = text + ids
    rng.shuffle(items)
    return items


def many_items(n: int, seed: int = 1) -> list[Item]:
    """`n` items of mixed lengths, every one different: mostly token ids, some text."""
    rng = random.Random(seed)
    pairs = list(synth.generate(seed, 10))
    items = []
    for k in range(n):
        if k % 7 == 3:
            p = pairs[k % len(pairs)]
            items.append(Item.text(p.prompt, p.rejected if k % 2 else p.edited))
        else:
            items.append(Item.tokens([1, k % 300 + 3], [rng.randrange(3, 400)
                                                        for _ in range(1 + (k * 37) % 90)]))
    return items


def as_json(item: Item) -> dict[str, Any]:
    if item.response is not None:
        out: dict[str, Any] = {"prompt": item.prompt, "response": item.response}
        if item.spans is not None:
            out["spans"] = [list(s) for s in item.spans]
        return out
    return {"prompt_ids": list(item.prompt_ids or []),
            "response_ids": list(item.response_ids or [])}


@dataclass(frozen=True)
class Served:
    """One result of a direct POST /score with return_tokens."""

    rewards: np.ndarray
    token_ids: np.ndarray
    total: float
    offsets: np.ndarray | None
    tokens: list[str] | None
    span_rewards: np.ndarray | None


def served(url: str, items: Sequence[Item], *, per_request: int = 256,
           headers: dict[str, str] | None = None) -> list[Served]:
    """What the server itself answers for `items` (POST /score, in requests of `per_request`)."""
    out = []
    for first in range(0, len(items), per_request):
        r = httpx.post(f"{url}/score", headers=headers, timeout=TIMEOUT, json={
            "items": [as_json(i) for i in items[first:first + per_request]],
            "return_tokens": True})
        assert r.status_code == 200, r.text
        for x in r.json()["results"]:
            out.append(Served(
                np.array(x["rewards"], dtype=np.float32), np.array(x["token_ids"], dtype=np.int64),
                x["total"], None if x["offsets"] is None
                else np.array(x["offsets"], dtype=np.int64).reshape(-1, 2), x["tokens"],
                None if x["span_rewards"] is None
                else np.array(x["span_rewards"], dtype=np.float32)))
    return out


def assert_same(got: Sequence[ItemScore], want: Sequence[Served], *, exact: bool) -> None:
    """Same token ids, same rewards and totals: bit-equal when the rows went through the same
    forward passes as the direct answer's, else equal to rounding (other padding)."""
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert isinstance(g, ItemScore), k
        assert g.rewards.dtype == np.float32 and g.token_ids.dtype == np.int64, k
        assert np.array_equal(g.token_ids, w.token_ids), k
        if exact:
            assert np.array_equal(g.rewards, w.rewards), k
            assert g.total == w.total, k
        else:
            np.testing.assert_allclose(g.rewards, w.rewards, rtol=0, atol=1e-6, err_msg=str(k))
            assert g.total == pytest.approx(w.total, abs=1e-5), k


# ---------------------------------------------------------------- servers


def url_of(server: Running, scheme: str) -> str:
    return server.url if scheme == "http" else f"grpc://{server.grpc_target}"


def requests_total(url: str, transport: str, code: str = "ok",
                   headers: dict[str, str] | None = None) -> float:
    """tokenrm_requests_total{transport, code} from the server's /metrics (0 if not yet seen)."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=TIMEOUT).text
    for line in text.splitlines():
        if line.startswith("tokenrm_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            if labels == {"transport": transport, "code": code}:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


HOLD_S = 10  # how long the `held` server's batcher holds work


FLEET = {
    "server": {},                                                  # default settings
    "small": {"TOKENRM_MAX_ITEMS_PER_REQUEST": "16"},              # 16 items per request
    # 4 queued items at most, held 1 s by the batcher: concurrent requests overflow.
    "crowded": {"TOKENRM_MAX_QUEUE_ITEMS": "4", "TOKENRM_MAX_WAIT_MS": "1000"},
    "held": {"TOKENRM_MAX_WAIT_MS": str(HOLD_S * 1000)},           # work held HOLD_S seconds
    "guarded": {"TOKENRM_API_KEYS": "k1"},
}


@pytest.fixture(scope="module")
def fleet(tiny_checkpoint: Path) -> Iterator[dict[str, Running]]:
    """The module's servers, started and stopped all at once (each takes ~3 s, mostly imports)."""
    contexts = {name: serve(tiny_checkpoint, env=env, timeout_s=START_TIMEOUT)
                for name, env in FLEET.items()}
    with ThreadPoolExecutor(len(contexts)) as pool:
        entered = {name: pool.submit(cm.__enter__) for name, cm in contexts.items()}
    try:
        yield {name: f.result() for name, f in entered.items()}
    finally:
        with ThreadPoolExecutor(len(contexts)) as pool:
            for name, f in entered.items():
                if f.exception() is None:
                    pool.submit(contexts[name].__exit__, None, None, None)


@pytest.fixture(scope="module")
def server(fleet: dict[str, Running]) -> Running:
    return fleet["server"]


@pytest.fixture(scope="module")
def small(fleet: dict[str, Running]) -> Running:
    return fleet["small"]


@pytest.fixture(scope="module")
def crowded(fleet: dict[str, Running]) -> Running:
    return fleet["crowded"]


@pytest.fixture(scope="module")
def held(fleet: dict[str, Running]) -> Running:
    return fleet["held"]


@pytest.fixture(scope="module")
def guarded(fleet: dict[str, Running]) -> Running:
    return fleet["guarded"]


@pytest.fixture
def proxy(server: Running) -> Iterator[FaultyProxy]:
    with FaultyProxy(server.url, lifetime_s=120) as p:
        yield p


ITEMS = mixed_items()


# ---------------------------------------------------------------- 1. same results as the server


@pytest.mark.parametrize("scheme", SCHEMES)
def test_results_equal_the_servers_own(server: Running, scheme: str) -> None:
    want = served(server.url, ITEMS)
    with RewardClient(url_of(server, scheme), timeout_s=TIMEOUT) as client:
        plain = client.score(ITEMS)
        with_tokens = client.score(ITEMS, return_tokens=True)
    assert_same(plain, want, exact=True)
    assert_same(with_tokens, want, exact=True)
    for item, p, o, w in zip(ITEMS, plain, with_tokens, want, strict=True):
        assert p.offsets is None and p.span_rewards is None and o.span_rewards is None
        assert p.tokens is None and o.tokens is not None and o.tokens == w.tokens
        assert len(o.tokens) == len(w.rewards)
        if item.response is None:
            assert o.offsets is None
        else:
            assert w.offsets is not None and o.offsets is not None
            assert o.offsets.dtype == np.int64 and o.offsets.shape == (len(w.rewards), 2)
            assert np.array_equal(o.offsets, w.offsets)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_plain_dicts_of_the_json_shape_score_as_items_do(server: Running, scheme: str) -> None:
    want = served(server.url, ITEMS)
    with RewardClient(url_of(server, scheme), timeout_s=TIMEOUT) as client:
        assert_same(client.score([as_json(item) for item in ITEMS]), want, exact=True)
        with pytest.raises(TypeError, match=r"^items\[1\]: a dict with keys \['prompt', 'text'\]; "
                                            r"give an Item \(Item.text, Item.tokens\) or a dict"):
            client.score([as_json(ITEMS[0]), {"prompt": "p", "text": "r"}])
        with pytest.raises(TypeError, match=r"^items\[0\]: a str; give an Item"):
            client.submit(["Ana lives in Lima."])  # at once, not from the future


@pytest.mark.parametrize("scheme", SCHEMES)
def test_async_client_results_equal_the_servers_own(server: Running, scheme: str) -> None:
    want = served(server.url, ITEMS)

    async def main() -> tuple[list[ItemScore], list[ItemScore]]:
        async with AsyncRewardClient(url_of(server, scheme), timeout_s=TIMEOUT) as client:
            return (await client.score(ITEMS),
                    await client.score(ITEMS, return_tokens=True))

    plain, with_tokens = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert_same(plain, want, exact=True)
    assert_same(with_tokens, want, exact=True)
    for p, o, w in zip(plain, with_tokens, want, strict=True):
        assert p.offsets is None and p.tokens is None and o.tokens == w.tokens
        assert (o.offsets is None) == (w.offsets is None)
        if o.offsets is not None and w.offsets is not None:
            assert np.array_equal(o.offsets, w.offsets)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_model_info_matches_the_server(small: Running, scheme: str) -> None:
    http = httpx.get(f"{small.url}/v1/model", timeout=TIMEOUT).json()
    with RewardClient(url_of(small, scheme), timeout_s=TIMEOUT) as client:
        info = client.model_info()
    assert (info.name, info.kind, list(info.labels), info.reward_rule, info.vocab_size,
            info.max_len) == (http["name"], http["kind"], http["labels"], http["reward_rule"],
                              http["vocab_size"], http["max_len"])
    assert info.limits.max_items_per_request == 16
    assert info.limits.max_tokens_per_item == http["limits"]["max_tokens_per_item"]


# ---------------------------------------------------------------- 2. splitting and order


@pytest.mark.parametrize("scheme", SCHEMES)
def test_many_items_are_split_under_the_server_limit_and_come_back_in_order(
        small: Running, scheme: str) -> None:
    items = many_items(300)
    want = served(small.url, items, per_request=16)
    before = requests_total(small.url, scheme)
    with RewardClient(url_of(small, scheme), timeout_s=TIMEOUT) as client:
        got = client.score(items)
    sent = requests_total(small.url, scheme) - before
    assert_same(got, want, exact=False)
    assert sent >= math.ceil(300 / 16)


def test_items_per_request_splits_further_and_max_in_flight_bounds_concurrency(
        small: Running) -> None:
    items = many_items(60, seed=2)
    want = served(small.url, items, per_request=16)
    with FaultyProxy(small.url) as proxy, \
            RewardClient(proxy.url, timeout_s=TIMEOUT, items_per_request=5,
                         max_in_flight=2) as client:
        got = client.score(items)
        assert proxy.score_requests == 12
        assert proxy.max_concurrent_score <= 2
    assert_same(got, want, exact=False)


# ---------------------------------------------------------------- 3. policy alignment (spans)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_spans_give_one_reward_per_span_summing_to_the_total(server: Running,
                                                            scheme: str) -> None:
    items = [Item.text(i.prompt or "", i.response or "", spans=_words(i.response or ""))
             for i in ITEMS if i.response is not None]
    want = served(server.url, items)
    with RewardClient(url_of(server, scheme), timeout_s=TIMEOUT) as client:
        got = client.score(items)
    assert_same(got, want, exact=True)
    for item, g, w in zip(items, got, want, strict=True):
        assert g.span_rewards is not None and g.span_rewards.dtype == np.float32
        assert len(g.span_rewards) == len(item.spans or [])
        assert w.span_rewards is not None
        assert np.array_equal(g.span_rewards, w.span_rewards)
        assert float(np.sum(g.span_rewards, dtype=np.float64)) == \
            pytest.approx(g.total, abs=1e-5)


# ---------------------------------------------------------------- 4. retries


def test_refusals_are_retried_after_the_servers_retry_after(server: Running,
                                                            proxy: FaultyProxy) -> None:
    want = served(server.url, ITEMS)
    with RewardClient(proxy.url, timeout_s=TIMEOUT) as client:
        client.model_info()  # limits read before the clock starts
        proxy.reset()
        proxy.refuse(2, status=429, retry_after="1")
        started = time.monotonic()
        got = client.score(ITEMS)
        elapsed = time.monotonic() - started
        assert proxy.score_requests == 3
        # Two refusals, each saying "Retry-After: 1": at least 1 s after each.
        assert elapsed >= 1.9, elapsed
        assert_same(got, want, exact=True)

        proxy.reset()
        proxy.refuse(1, status=503, retry_after="1")
        assert_same(client.score(ITEMS), want, exact=True)
        assert proxy.score_requests == 2


def test_refusals_that_outlive_the_attempts_are_a_server_error(proxy: FaultyProxy) -> None:
    with RewardClient(proxy.url, timeout_s=TIMEOUT,
                      retry=RetryPolicy(max_attempts=2)) as client:
        client.model_info()
        proxy.reset()
        proxy.refuse(None, status=429, retry_after="1")
        with pytest.raises(ServerError) as failed:
            client.score(ITEMS[:3])
    assert failed.value.retry_after_s == pytest.approx(1.0)
    assert proxy.score_requests == 2


def test_submit_returns_at_once_and_close_cancels_what_is_still_running(
        proxy: FaultyProxy) -> None:
    client = RewardClient(proxy.url, timeout_s=TIMEOUT)
    client.model_info()
    done = client.submit(ITEMS[:3])
    assert len(done.result(timeout=TIMEOUT)) == 3
    proxy.refuse(None, status=503, retry_after="1")  # retried until the deadline, 30 s away
    started = time.monotonic()
    stuck = client.submit(ITEMS[:3])
    assert not stuck.done()
    client.close()
    assert stuck.cancelled()
    assert time.monotonic() - started < TIMEOUT / 3  # not waiting out the call's deadline


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_full_server_queue_is_retried_until_it_succeeds(server: Running, crowded: Running,
                                                          scheme: str) -> None:
    """Four requests of 2 items at once, into a queue of 4 items that the batcher holds 1 s:
    some are refused (RESOURCE_EXHAUSTED with retry-after-ms, or 429) and retried."""
    items = many_items(8, seed=3)
    want = served(server.url, items)  # the same model, without the 1 s waits
    refused = "overloaded"
    before = requests_total(crowded.url, scheme, refused)
    with RewardClient(url_of(crowded, scheme), timeout_s=TIMEOUT, items_per_request=2,
                      max_in_flight=4) as client:
        got = client.score(items)
    assert_same(got, want, exact=False)
    assert requests_total(crowded.url, scheme, refused) - before >= 1


# ---------------------------------------------------------------- 5. a server restarted mid-call


def test_a_call_survives_a_server_killed_and_restarted_mid_call(tiny_checkpoint: Path,
                                                               server: Running) -> None:
    """One HTTP and one gRPC call, each of 30 requests, 2 in flight, against a server whose
    batcher holds work 100 ms; SIGKILL once both are under way, restart on the same ports: both
    calls complete with the right results."""
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"TOKENRM_MAX_WAIT_MS": "100"}
    items = many_items(120, seed=4)
    want = served(server.url, items)  # the same model, without the 100 ms waits
    proc = start(tiny_checkpoint, port, grpc_port, env, timeout_s=START_TIMEOUT)
    try:
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(2) as pool:
            # The calls' deadline covers the restart, however long a shared machine makes it.
            clients = [stack.enter_context(RewardClient(
                u, timeout_s=START_TIMEOUT + TIMEOUT, items_per_request=4, max_in_flight=2,
                retry=FAST_RETRY))
                for u in (url, f"grpc://127.0.0.1:{grpc_port}")]
            calls = [pool.submit(c.score, items) for c in clients]
            deadline = time.monotonic() + TIMEOUT
            while (requests_total(url, "http") < 3 or requests_total(url, "grpc") < 3) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.kill()
            proc.wait(timeout=10)
            assert not any(c.done() for c in calls), "the calls ended before the kill"
            proc = start(tiny_checkpoint, port, grpc_port, env, timeout_s=START_TIMEOUT)
            results = [c.result(timeout=START_TIMEOUT + TIMEOUT) for c in calls]
        for got in results:
            assert_same(got, want, exact=False)
        # The second process answered part of each call.
        assert requests_total(url, "http") >= 1 and requests_total(url, "grpc") >= 1
    finally:
        stop(proc)


# ---------------------------------------------------------------- 6. input errors


def _with_oov_item(vocab_size: int) -> list[Item]:
    items = many_items(50, seed=5)
    items = [i if i.response is None else Item.tokens([1, 2], [5, 6, 7]) for i in items]
    items[37] = Item.tokens([1, 2], [5, vocab_size, 6])
    return items


def test_an_input_error_names_the_callers_item_and_is_not_retried_http(small: Running) -> None:
    with FaultyProxy(small.url) as proxy, \
            RewardClient(proxy.url, timeout_s=TIMEOUT, retry=FAST_RETRY) as client:
        items = _with_oov_item(client.model_info().vocab_size)
        proxy.reset()
        before = requests_total(small.url, "http", "invalid_input")
        with pytest.raises(InputError) as refused:
            client.score(items)
        assert (refused.value.item, refused.value.field) == (37, "response_ids")
        assert "items[37]" in refused.value.message
        assert proxy.score_requests <= math.ceil(50 / 16)  # 4 requests, none sent twice
    assert requests_total(small.url, "http", "invalid_input") - before == 1


def test_an_input_error_names_the_callers_item_and_is_not_retried_grpc(small: Running) -> None:
    with RewardClient(f"grpc://{small.grpc_target}", timeout_s=TIMEOUT,
                      retry=FAST_RETRY) as client:
        items = _with_oov_item(client.model_info().vocab_size)
        before = requests_total(small.url, "grpc", "invalid_input")
        with pytest.raises(InputError) as refused:
            client.score(items)
    assert (refused.value.item, refused.value.field) == (37, "response_ids")
    assert "items[37]" in refused.value.message
    time.sleep(0.3)  # a retry, if there were one, would have reached the server by now
    assert requests_total(small.url, "grpc", "invalid_input") - before == 1


# ---------------------------------------------------------------- 7. deadlines


def test_the_calls_deadline_holds(held: Running) -> None:
    """A deadline of 0.5 s, given to the call or as the client's default, over both transports,
    against a server that holds work HOLD_S (10 s): DeadlineError, not the answer the held work
    would give, and well before it (within 10x the deadline, half the hold).
    The four calls run at once: the batcher's wait runs from the oldest row queued, even one
    whose caller has gone, so calls made one after the other could ride an earlier wait."""
    def call(url: str, per_call: bool) -> tuple[BaseException | None, float]:
        with RewardClient(url, timeout_s=TIMEOUT if per_call else 0.5) as client:
            started = time.monotonic()
            try:
                client.score(ITEMS[:4], timeout_s=0.5 if per_call else None)
            except BaseException as exc:  # reported below
                return exc, time.monotonic() - started
            return None, time.monotonic() - started

    cases = [(url_of(held, scheme), per_call) for scheme in SCHEMES for per_call in (True, False)]
    with ThreadPoolExecutor(len(cases)) as pool:
        outcomes = list(pool.map(lambda case: call(*case), cases))
    for case, (error, elapsed) in zip(cases, outcomes, strict=True):
        assert isinstance(error, DeadlineError), (case, error)
        assert elapsed < HOLD_S / 2, (case, elapsed)


# ---------------------------------------------------------------- 8. several endpoints


class _Listener(socketserver.ThreadingTCPServer):
    daemon_threads = True


class DeadEndpoint:
    """An endpoint that takes connections and counts what reaches it, but never answers: over
    HTTP it reads each request's head and closes the connection (the client sees a transport
    error, as from a dead server); over gRPC every call, health checks included, ends
    UNAVAILABLE (what a refused connection gives). `calls`: one entry per request that reached
    it, 'POST /score' or '/tokenrm.v1.RewardService/Score' and so on."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def url(self, scheme: str) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}" if scheme == "http" \
            else f"grpc://127.0.0.1:{self._grpc_port}"

    def score_requests(self, scheme: str) -> int:
        return self._count("POST /score" if scheme == "http"
                           else "/tokenrm.v1.RewardService/Score")

    def health_checks(self, scheme: str) -> int:
        return self._count("GET /readyz" if scheme == "http" else "/grpc.health.v1.Health/Check")

    def _count(self, call: str) -> int:
        with self._lock:
            return self.calls.count(call)

    def _record(self, call: str) -> None:
        with self._lock:
            self.calls.append(call)

    def __enter__(self) -> DeadEndpoint:
        record = self._record

        class Hangup(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                method, path = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
                record(f"{method} {path}")  # and close the connection without an answer

        class Unavailable(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                record(details.method)

                def refuse(_request: bytes, context: grpc.ServicerContext) -> bytes:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "this endpoint is dead")
                    raise AssertionError("abort raises")

                return grpc.unary_unary_rpc_method_handler(refuse)

        self._http = _Listener(("127.0.0.1", 0), Hangup)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self._grpc = grpc.server(ThreadPoolExecutor(4), handlers=[Unavailable()])
        self._grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._grpc.stop(None)
        self._http.shutdown()
        self._http.server_close()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_dead_endpoint_is_avoided(server: Running, scheme: str) -> None:
    """A dead endpoint beside a live one: the first score requests that reach it (at most the
    ones already in flight) take it out of the rotation; from then on only its health checks
    reach it, and the live server answers every request, each once."""
    items = many_items(40, seed=6)  # 10 requests of 4 items per call
    want = served(server.url, items, per_request=4)
    before = requests_total(server.url, scheme)
    with DeadEndpoint() as dead, RewardClient(
            [url_of(server, scheme), dead.url(scheme)], timeout_s=TIMEOUT, items_per_request=4,
            max_in_flight=4, retry=FAST_RETRY) as client:
        assert_same(client.score(items), want, exact=False)
        # Least outstanding first: while one request waits on the live server the next goes
        # to the dead one, so it was in the rotation; only requests in flight at once reach it.
        first_call = dead.score_requests(scheme)
        assert 1 <= first_call <= 4, dead.calls
        deadline = time.monotonic() + TIMEOUT  # its health checks go on and keep failing
        while dead.health_checks(scheme) < 2:
            assert time.monotonic() < deadline, dead.calls
            time.sleep(0.05)
        assert_same(client.score(items), want, exact=False)
        assert dead.score_requests(scheme) == first_call, dead.calls
    assert requests_total(server.url, scheme) - before == 20


@pytest.mark.parametrize("scheme", SCHEMES)
def test_requests_are_spread_over_live_endpoints(server: Running, small: Running,
                                                 scheme: str) -> None:
    items = many_items(100, seed=7)
    want = served(server.url, items, per_request=4)
    before = [requests_total(s.url, scheme) for s in (server, small)]
    with RewardClient([url_of(server, scheme), url_of(small, scheme)], timeout_s=TIMEOUT,
                      items_per_request=4, max_in_flight=4) as client:
        got = client.score(items)
    assert_same(got, want, exact=False)
    sent = [requests_total(s.url, scheme) - b for s, b in zip((server, small), before,
                                                              strict=True)]
    assert all(n >= 1 for n in sent), sent
    assert sum(sent) == 25


def test_a_failed_endpoint_leaves_the_rotation_and_returns_after_its_health_check(
        tiny_checkpoint: Path, server: Running) -> None:
    port, grpc_port = free_port(), free_port()
    other = f"http://127.0.0.1:{port}"
    items = many_items(40, seed=8)
    want = served(server.url, items, per_request=4)
    proc = start(tiny_checkpoint, port, grpc_port, {}, timeout_s=START_TIMEOUT)
    try:
        with RewardClient([server.url, other], timeout_s=TIMEOUT, items_per_request=4,
                          retry=FAST_RETRY) as client:
            assert_same(client.score(items), want, exact=False)
            assert requests_total(other, "http") >= 1  # in the rotation
            proc.kill()
            proc.wait(timeout=10)
            assert_same(client.score(items), want, exact=False)  # all on the live one
            # A fresh process: its counts start at 0.
            proc = start(tiny_checkpoint, port, grpc_port, {}, timeout_s=START_TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while requests_total(other, "http") == 0 and time.monotonic() < deadline:
                assert_same(client.score(items), want, exact=False)
                time.sleep(0.1)
            assert requests_total(other, "http") >= 1  # back after its health check passed
    finally:
        stop(proc)


# ---------------------------------------------------------------- 9. malformed answers


@pytest.mark.parametrize("how", ["drop", "nan"])
def test_a_malformed_answer_is_a_result_error(proxy: FaultyProxy, how: str) -> None:
    with RewardClient(proxy.url, timeout_s=TIMEOUT, retry=FAST_RETRY) as client:
        proxy.tamper(how)
        for items in ([i for i in ITEMS if i.response is None],
                      [i for i in ITEMS if i.response is not None]):
            with pytest.raises(ResultError):
                client.score(items)


# ---------------------------------------------------------------- 10. no torch


def test_the_client_imports_without_torch_or_transformers() -> None:
    check = ("import sys, tokenrm.client; "
             "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- 11. API keys


def test_api_keys(guarded: Running) -> None:
    key = {"authorization": "Bearer k1"}
    want = served(guarded.url, ITEMS, headers=key)
    with FaultyProxy(guarded.url) as proxy:
        for url in (proxy.url, f"grpc://{guarded.grpc_target}"):
            for api_key in (None, "nope"):
                with RewardClient(url, api_key=api_key, timeout_s=TIMEOUT) as client:
                    proxy.reset()
                    started = time.monotonic()
                    with pytest.raises(AuthenticationError):
                        client.score(ITEMS)
                    # Not retried: refused without waiting (a retry loop would run to the
                    # 30 s deadline), and over HTTP at most one POST /score went out.
                    assert time.monotonic() - started < TIMEOUT / 3, (url, api_key)
                    assert proxy.score_requests <= 1, (url, api_key)
            with RewardClient(url, api_key="k1", timeout_s=TIMEOUT) as client:
                assert_same(client.score(ITEMS), want, exact=True)
    assert requests_total(guarded.url, "grpc", "ok", headers=key) >= 1
