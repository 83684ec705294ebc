"""Overload through Ray Serve's proxies: a replica's own refusal (429 with Retry-After and the
tokenrm error body; RESOURCE_EXHAUSTED with retry-after-ms) reaches the caller unchanged, and
nothing is a 5xx. One replica of the tiny model whose queue holds 4 items, held 1 s to batch."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from tests.ray_serving import ray_serving
from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.launcher import Running

ITEMS = [{"prompt_ids": [1, 5, 9], "response_ids": [7, 8]}] * 3


@pytest.fixture(scope="module")
def crowded(tiny_checkpoint: Path) -> Iterator[Running]:
    with ray_serving(tiny_checkpoint, "--replicas", "1", env={
            "TOKENRM_MAX_QUEUE_ITEMS": "4", "TOKENRM_MAX_WAIT_MS": "1000"}) as running:
        yield running


def test_overload_is_refused_with_a_hint_over_http(crowded: Running) -> None:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{crowded.url}/score",
                                                     json={"items": ITEMS}, timeout=60),
                                range(8)))
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for refused in (r for r in answers if r.status_code == 429):
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "overloaded"  # ours, not the proxy's


def test_overload_is_refused_with_a_hint_over_grpc(crowded: Running) -> None:
    request = pb.ScoreRequest(items=[pb.Item(**it) for it in ITEMS])
    with grpc.insecure_channel(crowded.grpc_target) as channel:
        stub = pb_grpc.RewardServiceStub(channel)

        def call(_: int) -> grpc.StatusCode | dict[str, str]:
            try:
                stub.Score(request, timeout=60)
            except grpc.RpcError as exc:
                return {"code": exc.code().name, **dict(exc.trailing_metadata() or ())}
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(call, range(8)))
    refused = [o for o in outcomes if isinstance(o, dict)]
    assert refused and len(refused) < len(outcomes), outcomes
    for o in refused:
        assert o["code"] == "RESOURCE_EXHAUSTED" and o["tokenrm-error-code"] == "overloaded", o
        assert int(o["retry-after-ms"]) > 0
