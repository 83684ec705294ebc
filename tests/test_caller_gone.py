"""A caller that goes away while its request waits in the queue: its rows are dropped, never
computed, over HTTP (the connection closes) and gRPC (the call is cancelled) alike. The server
holds a lone row for up to 3 s (TOKENRM_MAX_WAIT_MS) hoping to fill a batch of 2, which gives
the caller time to leave; a request of 2 items fills a batch at once and is computed."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.launcher import Running, serve

HOLD_S = 3.0
ITEM = {"prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10, 11]}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Running]:
    env = {"TOKENRM_MAX_WAIT_MS": f"{HOLD_S * 1000:g}", "TOKENRM_MAX_BATCH_SIZE": "2"}
    with serve(tiny_checkpoint, env=env) as running:
        yield running


def _metric(server: Running, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m[1] == name and ",".join(sorted((m[2] or "").split(","))) == want:
            return float(m[3])
    return 0.0


def _queued(server: Running) -> int:
    return int(httpx.get(f"{server.url}/readyz", timeout=10).json()["queued"])


def _until(check, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _leaves_while_queued(server: Running, send_then_leave) -> None:  # type: ignore[no-untyped-def]
    """One lone row queued, its caller gone: out of the queue at once, and no forward pass
    runs for it (none at all: nothing else is sent meanwhile)."""
    batches = _metric(server, "tokenrm_batch_size_count")
    started = time.monotonic()
    send_then_leave(lambda: _until(lambda: _queued(server) == 1, HOLD_S / 2))
    assert _until(lambda: _queued(server) == 0, 1.0), "the row stayed queued after its caller left"
    time.sleep(max(0.0, started + HOLD_S + 0.5 - time.monotonic()))  # past the hold
    assert _metric(server, "tokenrm_batch_size_count") == batches, "the row was computed"


def test_an_http_caller_that_hangs_up_is_not_computed(server: Running) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"items": [ITEM]}).encode()
    head = (f"POST /score HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()

    def send_then_leave(queued) -> None:  # type: ignore[no-untyped-def]
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head + body)
            assert queued(), "the request never reached the queue"
        # the socket is closed here: the caller has hung up

    before = _metric(server, "tokenrm_requests_total", transport="http", code="cancelled")
    _leaves_while_queued(server, send_then_leave)
    assert _metric(server, "tokenrm_requests_total", transport="http",
                   code="cancelled") == before + 1
    # the server goes on: a full batch (2 items) is scored at once
    answer = httpx.post(f"{server.url}/score", json={"items": [ITEM, ITEM]}, timeout=HOLD_S / 2)
    assert answer.status_code == 200 and len(answer.json()["results"]) == 2


def test_a_cancelled_grpc_call_is_not_computed(server: Running) -> None:
    item = pb.Item(prompt_ids=ITEM["prompt_ids"], response_ids=ITEM["response_ids"])

    def send_then_leave(queued) -> None:  # type: ignore[no-untyped-def]
        with grpc.insecure_channel(server.grpc_target) as channel:
            call = pb_grpc.RewardServiceStub(channel).Score.future(
                pb.ScoreRequest(items=[item]), timeout=30)
            assert queued(), "the call never reached the queue"
            call.cancel()

    before = _metric(server, "tokenrm_requests_total", transport="grpc", code="cancelled")
    _leaves_while_queued(server, send_then_leave)
    assert _metric(server, "tokenrm_requests_total", transport="grpc",
                   code="cancelled") == before + 1
