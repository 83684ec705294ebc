"""The gRPC API against real `tokenrm serve` processes on 127.0.0.1, over real channels: parity
with HTTP, streams, bad input, message size, model info, health and reflection, API keys,
deadlines, TLS and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.launcher import Running, serve
from tokenrm.training import synth

TIMEOUT = 30.0
SERVICE = "tokenrm.v1.RewardService"
SERVING = health_pb2.HealthCheckResponse.SERVING
Answer = dict[str, Any]  # a ScoreResponse in one shape for both transports (see `grpc_answer`)
Metadata = Sequence[tuple[str, str]]


def _mixed_items() -> list[dict[str, Any]]:
    """Text items of different lengths, text items with word spans and token-id items from 1 to
    150 response tokens, shuffled; in the JSON form (`item_proto` makes the protobuf one)."""
    pairs = list(synth.generate(11, 3))
    text: list[dict[str, Any]] = [{"prompt": p.prompt, "response": r}
                                  for p in pairs for r in (p.rejected, p.edited)]
    text.append({"prompt": "Facts: Ana lives in Lima.",
                 "response": " ".join(p.edited for p in pairs)})
    text.append({"prompt": "Where?", "response": "Köln. Łódź."})  # offsets in code points
    spans = [{**t, "spans": [list(m.span()) for m in re.finditer(r"\S+", t["response"])]}
             for t in text[:3] + text[-1:]]
    rng = random.Random(0)
    ids = [{"prompt_ids": [rng.randrange(3, 400) for _ in range(rng.randint(0, 30))],
            "response_ids": [rng.randrange(3, 400) for _ in range(n)]} for n in (1, 7, 60, 150)]
    items = text + spans + ids
    rng.shuffle(items)
    return items


ITEMS = _mixed_items()
BODY = {"items": ITEMS, "return_tokens": True}


def item_proto(item: dict[str, Any]) -> pb.Item:
    return pb.Item(prompt=item.get("prompt"), response=item.get("response"),
                   prompt_ids=item.get("prompt_ids"), response_ids=item.get("response_ids"),
                   spans=[pb.Span(start=s, end=e) for s, e in item.get("spans", [])])


REQUEST = pb.ScoreRequest(items=[item_proto(i) for i in ITEMS], return_tokens=True)


def ids_request(*lengths: int) -> pb.ScoreRequest:
    """One token-id item per length: a 4-token prompt and that many response tokens."""
    return pb.ScoreRequest(items=[
        pb.Item(prompt_ids=[5, 6, 7, 8], response_ids=[3 + (13 * j + n) % 397 for j in range(n)])
        for n in lengths])


def grpc_answer(m: pb.ScoreResponse) -> Answer:
    assert not m.HasField("error"), m.error
    return {"model": m.model, "usage": (m.usage.items, m.usage.tokens), "results": [{
        "rewards": np.array(r.rewards, dtype=np.float32), "total": r.total,
        "token_ids": list(r.token_ids), "tokens": list(r.tokens), "offsets": list(r.offsets),
        "span_rewards": np.array(r.span_rewards, dtype=np.float32)} for r in m.results]}


def http_answer(r: httpx.Response) -> Answer:
    """A POST /score answer in `grpc_answer`'s shape: float32 rewards, flattened offsets."""
    assert r.status_code == 200, r.text
    body = r.json()
    return {"model": body["model"], "usage": (body["usage"]["items"], body["usage"]["tokens"]),
            "results": [{
                "rewards": np.array(x["rewards"], dtype=np.float32), "total": x["total"],
                "token_ids": x["token_ids"], "tokens": x["tokens"] or [],
                "offsets": [i for pair in x["offsets"] or [] for i in pair],
                "span_rewards": np.array(x["span_rewards"] or [], dtype=np.float32)}
                for x in body["results"]]}


def assert_same_answer(a: Answer, b: Answer, *, bitwise: bool) -> None:
    """Same model, usage, token ids, tokens and offsets; rewards bit-equal, or, for answers whose
    rows shared forward passes with other requests' rows (other padding), equal to rounding."""
    assert (a["model"], a["usage"]) == (b["model"], b["usage"])
    for x, y in zip(a["results"], b["results"], strict=True):
        assert (x["token_ids"], x["tokens"], x["offsets"]) == \
            (y["token_ids"], y["tokens"], y["offsets"])
        for key in ("rewards", "span_rewards"):
            if bitwise:
                assert np.array_equal(x[key], y[key])
                assert np.array_equal(x[key].view(np.uint32), y[key].view(np.uint32))
            else:
                np.testing.assert_allclose(x[key], y[key], rtol=0, atol=1e-6)
        assert x["total"] == (y["total"] if bitwise else pytest.approx(y["total"], abs=1e-5))


def assert_still_serving(stub: pb_grpc.RewardServiceStub) -> None:
    assert len(stub.Score(ids_request(3), timeout=TIMEOUT).results[0].rewards) == 3


def metric(server: Running, name: str) -> float:
    """An unlabelled sample of the server's /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.split(" ", 1)[0] == name)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Running]:
    """The shared server, default settings."""
    with serve(tiny_checkpoint) as running:
        yield running


@pytest.fixture(scope="module")
def slow(tiny_checkpoint: Path) -> Iterator[Running]:
    """A server whose batcher waits 1 s for a batch to fill: work stays queued that long."""
    with serve(tiny_checkpoint, env={"TOKENRM_MAX_WAIT_MS": "1000"}) as running:
        yield running


@pytest.fixture(scope="module")
def small_messages(tiny_checkpoint: Path) -> Iterator[pb_grpc.RewardServiceStub]:
    """A server whose gRPC messages may hold 2048 bytes at most, either way."""
    with serve(tiny_checkpoint, env={"TOKENRM_GRPC_MAX_MESSAGE_BYTES": "2048"}) as running, \
            grpc.insecure_channel(running.grpc_target) as ch:
        yield pb_grpc.RewardServiceStub(ch)


# ---------------------------------------------------------------- parity with HTTP


def test_grpc_and_http_answers_are_bit_equal(server: Running,
                                             stub: pb_grpc.RewardServiceStub) -> None:
    over_grpc = grpc_answer(stub.Score(REQUEST, timeout=TIMEOUT))
    over_http = http_answer(httpx.post(f"{server.url}/score", json=BODY, timeout=TIMEOUT))
    assert_same_answer(over_grpc, over_http, bitwise=True)
    # The items hold what parity is about: tokens, offsets of text items, span rewards.
    for item, r in zip(ITEMS, over_grpc["results"], strict=True):
        n = len(r["rewards"])
        assert len(r["token_ids"]) == len(r["tokens"]) == n > 0
        assert len(r["offsets"]) == (2 * n if "response" in item else 0)
        assert len(r["span_rewards"]) == len(item.get("spans", []))


def test_concurrent_answers_equal_the_sequential_one(server: Running,
                                                     stub: pb_grpc.RewardServiceStub) -> None:
    """16 gRPC and 16 HTTP calls at once. Their rows share forward passes, so rewards may differ
    from the sequential answer in the last float32 bit (padding); all else is exact."""
    sequential = grpc_answer(stub.Score(REQUEST, timeout=TIMEOUT))

    async def at_once() -> list[Answer]:
        async with grpc.aio.insecure_channel(server.grpc_target) as ch, \
                httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            aio_stub = pb_grpc.RewardServiceStub(ch)

            async def over_grpc() -> Answer:
                return grpc_answer(await aio_stub.Score(REQUEST, timeout=TIMEOUT))

            async def over_http() -> Answer:
                return http_answer(await client.post("/score", json=BODY))

            return await asyncio.gather(*(call() for call in [over_grpc, over_http] * 16))

    answers = asyncio.run(at_once())
    assert len(answers) == 32
    for answer in answers:
        assert_same_answer(sequential, answer, bitwise=False)


# ---------------------------------------------------------------- ScoreStream


def test_stream_answers_in_request_order_and_goes_on_after_bad_requests(
        stub: pb_grpc.RewardServiceStub) -> None:
    requests = [ids_request(*(1 + (7 * k + 31 * j) % 150 for j in range(1 + k % 4)))
                for k in range(40)]
    bad_item = len(requests[13].items)
    requests[13].items.append(pb.Item(prompt_ids=[1], response_ids=[7, 400]))
    requests[27] = pb.ScoreRequest()
    answers = list(stub.ScoreStream(iter(requests), timeout=TIMEOUT))  # written without waiting
    assert len(answers) == len(requests)
    oov, empty = answers[13], answers[27]
    assert (oov.error.code, oov.error.item, oov.error.field) == \
        ("invalid_input", bad_item, "response_ids")
    assert oov.error.message.startswith(f"items[{bad_item}].response_ids[1]: token id 400")
    assert (empty.error.code, empty.error.field, empty.error.HasField("item")) == \
        ("invalid_input", "items", False)
    assert not oov.results and not empty.results
    for k, (request, answer) in enumerate(zip(requests, answers, strict=True)):
        if k not in (13, 27):
            unary = grpc_answer(stub.Score(request, timeout=TIMEOUT))
            assert_same_answer(unary, grpc_answer(answer), bitwise=False)


def test_stream_requests_are_all_in_flight_at_once(slow: Running) -> None:
    """The stream reads on without waiting for answers: 40 requests, one forward pass (this
    server's batcher gathers what arrives within 1 s)."""
    lengths = list(range(1, 41))
    before = metric(slow, "tokenrm_batch_size_count")
    with grpc.insecure_channel(slow.grpc_target) as ch:
        answers = list(pb_grpc.RewardServiceStub(ch).ScoreStream(
            (ids_request(n) for n in lengths), timeout=TIMEOUT))
    assert [len(a.results[0].rewards) for a in answers] == lengths
    assert metric(slow, "tokenrm_batch_size_count") - before == 1


# ---------------------------------------------------------------- bad input


def _ids(n: int) -> pb.Item:
    return pb.Item(prompt_ids=[1, 5], response_ids=[7] * n)


def _text(*spans: tuple[int, int]) -> pb.Item:
    return pb.Item(prompt="a", response="abc", spans=[pb.Span(start=s, end=e) for s, e in spans])


BAD = [
    # (name, items, item, field, words in the message): the HTTP table, where protobuf can say it
    ("no items", [], None, "items", "at least one item"),
    ("empty response", [pb.Item(prompt="a", response="")], 0, "response", "empty"),
    ("empty response ids", [pb.Item(prompt_ids=[1])], 0, "response_ids", "empty"),
    ("text and ids", [pb.Item(prompt="a", response="b", prompt_ids=[1])], 0, None, "not both"),
    ("nothing", [pb.Item()], 0, "prompt", "needs prompt and response"),
    ("prompt only", [pb.Item(prompt="a")], 0, "response", "needs prompt and response"),
    ("negative id", [pb.Item(prompt_ids=[1], response_ids=[-1])], 0, "response_ids",
     "outside the vocabulary"),
    ("out-of-vocabulary prompt id", [pb.Item(prompt_ids=[99999], response_ids=[5])], 0,
     "prompt_ids", "outside the vocabulary"),
    ("out-of-vocabulary response id", [pb.Item(prompt_ids=[1], response_ids=[5, 400])], 0,
     "response_ids", "token id 400 is outside the vocabulary [0, 400)"),
    ("span out of range", [_text((0, 9))], 0, "spans", "<= 3"),
    ("negative span", [_text((-1, 2))], 0, "spans", "0 <= start"),
    ("overlapping spans", [_text((0, 2), (1, 3))], 0, "spans", "overlap"),
    ("spans on ids", [pb.Item(prompt_ids=[1], response_ids=[2], spans=[pb.Span(start=0, end=1)])],
     0, "spans", "text items only"),
    ("the second item", [_text(), pb.Item(prompt="a", response="")], 1, "response", "empty"),
    ("too many items", [_ids(1)] * 257, None, "items", "257 items; the limit is 256"),
    ("over the model maximum", [_ids(500)], 0, "response_ids", "500 tokens; the limit is 192"),
]


@pytest.mark.parametrize(("name", "items", "item", "field", "words"), BAD,
                         ids=[b[0] for b in BAD])
def test_bad_input_is_invalid_argument_naming_item_and_field(
        stub: pb_grpc.RewardServiceStub, name: str, items: list[pb.Item], item: int | None,
        field: str | None, words: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.Score(pb.ScoreRequest(items=items), timeout=TIMEOUT)
    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    where = "items" if item is None else f"items[{item}]" + (f".{field}" if field else "")
    assert error.details().startswith(where) and words in error.details()
    expected = {"tokenrm-error-code": "invalid_input"}
    if item is not None:
        expected["tokenrm-item"] = str(item)
    if field is not None:
        expected["tokenrm-field"] = field
    assert {k: v for k, v in error.trailing_metadata() if k.startswith("tokenrm-")} == expected
    assert_still_serving(stub)


UNDECODABLE = {
    "invalid UTF-8": pb.ScoreRequest(items=[pb.Item(prompt="ab", response="c")])
    .SerializeToString().replace(b"ab", b"\xff\xfe"),
    "corrupt wire format": b"\xff\xff\xff",
}


@pytest.mark.parametrize("message", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
def test_an_undecodable_message_is_invalid_argument_and_the_server_goes_on(
        channel: grpc.Channel, stub: pb_grpc.RewardServiceStub, message: bytes) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(f"/{SERVICE}/Score")(message, timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid tokenrm.v1.ScoreRequest" in refused.value.details()
    assert dict(refused.value.trailing_metadata())["tokenrm-error-code"] == "bad_request"
    assert_still_serving(stub)


def test_on_a_stream_an_undecodable_message_fails_only_its_request(
        channel: grpc.Channel) -> None:
    call = channel.stream_stream(f"/{SERVICE}/ScoreStream")
    good = ids_request(3).SerializeToString()
    answers = [pb.ScoreResponse.FromString(a) for a in call(
        iter([good, UNDECODABLE[next(iter(UNDECODABLE))], good]), timeout=TIMEOUT)]
    assert [a.error.code for a in answers] == ["", "bad_request", ""]
    assert len(answers[2].results) == 1


# ---------------------------------------------------------------- message size


def test_a_request_over_the_message_limit_is_resource_exhausted(
        small_messages: pb_grpc.RewardServiceStub) -> None:
    stub = small_messages
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    assert info.limits.max_message_bytes == 2048
    big = ids_request(*[150] * 20)
    assert big.ByteSize() > 2048
    with pytest.raises(grpc.RpcError) as unary:
        stub.Score(big, timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as streamed:
        list(stub.ScoreStream(iter([ids_request(3), big]), timeout=TIMEOUT))
    for refused in (unary.value, streamed.value):
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Received message larger than max" in refused.details()
    assert_still_serving(stub)


def test_an_answer_over_the_message_limit_is_resource_exhausted(
        small_messages: pb_grpc.RewardServiceStub) -> None:
    request = ids_request(150, 150, 150, 150)  # ~1.3 kB asking for ~3.6 kB of rewards and ids
    assert request.ByteSize() < 2048
    with pytest.raises(grpc.RpcError) as refused:
        small_messages.Score(request, timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the message limit of 2048" in refused.value.details()
    assert dict(refused.value.trailing_metadata())["tokenrm-error-code"] == "payload_too_large"
    assert_still_serving(small_messages)


def test_on_a_stream_an_answer_over_the_limit_fails_only_its_request(
        small_messages: pb_grpc.RewardServiceStub) -> None:
    requests = [ids_request(3), ids_request(150, 150, 150, 150), ids_request(3)]
    answers = list(small_messages.ScoreStream(iter(requests), timeout=TIMEOUT))
    assert [a.HasField("error") for a in answers] == [False, True, False]


# ---------------------------------------------------------------- model, health, reflection


def test_model_info_matches_http(server: Running, stub: pb_grpc.RewardServiceStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    http = httpx.get(f"{server.url}/v1/model", timeout=TIMEOUT).json()
    limits = http.pop("limits")
    assert set(http) == {f.name for f in info.DESCRIPTOR.fields} - {"limits"}
    for name, value in http.items():
        optional = info.DESCRIPTOR.fields_by_name[name].has_presence  # null over HTTP: unset
        got = getattr(info, name) if not optional or info.HasField(name) else None
        assert (list(got) if isinstance(value, list) else got) == value, name
    assert info.labels == ["negative", "neutral", "positive"]
    for name in ("max_items_per_request", "max_tokens_per_item", "max_batch_tokens"):
        assert getattr(info.limits, name) == limits[name], name
    assert info.limits.max_message_bytes == 8 * 1024 * 1024  # the default; HTTP has its own


def test_health_is_serving_and_reflection_lists_the_services(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert check.status == SERVING, service
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
    listed, found = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter(asks), timeout=TIMEOUT)
    names = {s.name for s in listed.list_services_response.service}
    assert names >= {SERVICE, "grpc.health.v1.Health"}
    files = [descriptor_pb2.FileDescriptorProto.FromString(f)
             for f in found.file_descriptor_response.file_descriptor_proto]
    assert descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb) in files


# ---------------------------------------------------------------- API keys


def test_api_keys_guard_every_method_but_health(tiny_checkpoint: Path) -> None:
    request = ids_request(3)
    with serve(tiny_checkpoint, env={"TOKENRM_API_KEYS": "k1,k2"}) as running, \
            grpc.insecure_channel(running.grpc_target) as ch:
        stub = pb_grpc.RewardServiceStub(ch)
        calls: list[tuple[str, Callable[[Metadata], object], object]] = [
            ("Score", lambda md: stub.Score(request, metadata=md, timeout=TIMEOUT).usage.items,
             1),
            ("ScoreStream", lambda md: [a.usage.items for a in stub.ScoreStream(
                iter([request, request]), metadata=md, timeout=TIMEOUT)], [1, 1]),
            ("GetModelInfo", lambda md: stub.GetModelInfo(
                pb.GetModelInfoRequest(), metadata=md, timeout=TIMEOUT).name,
             tiny_checkpoint.name),
        ]
        for name, call, answer in calls:
            for bad in ((), (("authorization", "Bearer nope"),), (("authorization", "k2"),)):
                with pytest.raises(grpc.RpcError) as refused:
                    call(bad)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, bad)
                metadata = dict(refused.value.trailing_metadata())
                assert metadata["tokenrm-error-code"] == "unauthenticated"
            assert call((("authorization", "Bearer k2"),)) == answer, name
        check = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT)
        assert check.status == SERVING


# ---------------------------------------------------------------- deadlines


def test_calls_past_their_deadline_end_and_their_work_is_dropped(slow: Running) -> None:
    """Calls whose deadline passes while their work waits (this server holds work 1 s) end with
    DEADLINE_EXCEEDED (or, on a stream, get it as the answer); none of their work is computed,
    and the server goes on."""
    before = metric(slow, "tokenrm_tokens_total")
    with grpc.insecure_channel(slow.grpc_target) as ch:
        stub = pb_grpc.RewardServiceStub(ch)
        for request, timeout in ((ids_request(*[150] * 256), 0.001), (ids_request(100), 0.2)):
            with pytest.raises(grpc.RpcError) as late:
                stub.Score(request, timeout=timeout)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = stub.ScoreStream(iter([ids_request(100)]), timeout=0.2)
        errors: list[str] = []
        with contextlib.suppress(grpc.RpcError):
            errors.extend(a.error.code for a in stream)
        # The server times the request with the call's time left, and that timer races the
        # deadline: the call ends DEADLINE_EXCEEDED, or the request's answer is the error.
        expired = stream.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert expired or stream.code() == grpc.StatusCode.OK
        assert errors == ["deadline_exceeded"] or (expired and not errors)
        answer = stub.Score(ids_request(3), timeout=TIMEOUT)
    assert len(answer.results[0].rewards) == 3
    assert metric(slow, "tokenrm_tokens_total") - before == answer.usage.tokens


# ---------------------------------------------------------------- overload


def test_a_full_queue_is_resource_exhausted_with_a_retry_hint(tiny_checkpoint: Path) -> None:
    env = {"TOKENRM_MAX_WAIT_MS": "2000", "TOKENRM_MAX_QUEUE_ITEMS": "8"}
    with serve(tiny_checkpoint, env=env) as running, \
            grpc.insecure_channel(running.grpc_target) as ch:
        stub = pb_grpc.RewardServiceStub(ch)
        held = stub.Score.future(ids_request(*[5] * 8), timeout=TIMEOUT)  # queued for 2 s
        asyncio.run(_until_queued(running.url, 8))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(ids_request(3), timeout=TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in refused.value.details()
        metadata = dict(refused.value.trailing_metadata())
        assert metadata["tokenrm-error-code"] == "overloaded"
        assert int(metadata["retry-after-ms"]) > 0
        assert len(held.result().results) == 8  # what was queued is still answered
        assert_still_serving(stub)


# ---------------------------------------------------------------- TLS


def test_tls(tiny_checkpoint: Path, tmp_path: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    cert = tmp_path / "cert.pem"
    env = {"TOKENRM_GRPC_TLS_CERT": str(cert), "TOKENRM_GRPC_TLS_KEY": str(tmp_path / "key.pem")}
    with serve(tiny_checkpoint, env=env) as running:
        trusted = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(running.grpc_target, trusted) as ch:
            over_tls = grpc_answer(pb_grpc.RewardServiceStub(ch).Score(REQUEST, timeout=TIMEOUT))
        over_http = http_answer(httpx.post(f"{running.url}/score", json=BODY, timeout=TIMEOUT))
        assert_same_answer(over_tls, over_http, bitwise=True)
        with grpc.insecure_channel(running.grpc_target) as ch, \
                pytest.raises(grpc.RpcError) as plain:
            pb_grpc.RewardServiceStub(ch).Score(REQUEST, timeout=TIMEOUT)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- drain


async def _until_queued(url: str, rows: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
        while (await client.get("/readyz")).json()["queued"] < rows:
            await asyncio.sleep(0.02)


async def _drain(running: Running) -> None:
    async with grpc.aio.insecure_channel(running.grpc_target) as ch:
        stub = pb_grpc.RewardServiceStub(ch)
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT)
        assert (await watch.read()).status == SERVING
        lengths = list(range(1, 9))
        unary = [stub.Score(ids_request(*lengths), timeout=TIMEOUT) for _ in range(3)]
        stream = stub.ScoreStream(timeout=TIMEOUT)
        for _ in range(4):
            await stream.write(ids_request(5, 6))
        await asyncio.wait_for(_until_queued(running.url, 3 * 8 + 4 * 2), TIMEOUT)

        running.process.send_signal(signal.SIGTERM)
        assert not any(call.done() for call in unary)  # held by the batcher for 2 s
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        with pytest.raises(grpc.RpcError) as refused:
            await stub.Score(ids_request(3), timeout=TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await stream.write(ids_request(3))  # on the open stream: an answer with an error
        await stream.done_writing()

        for answer in await asyncio.gather(*unary):
            assert [len(r.rewards) for r in answer.results] == lengths
        answers = [a async for a in stream]
        assert [[len(r.rewards) for r in a.results] for a in answers] == [[5, 6]] * 4 + [[]]
        assert answers[-1].error.code == "unavailable" and answers[-1].error.retry_after_ms > 0
        assert await stream.code() == grpc.StatusCode.OK


def test_sigterm_drains_in_flight_calls_then_exits_zero(tiny_checkpoint: Path) -> None:
    """Calls queued when SIGTERM arrives (this server's batcher holds work 2 s) all complete;
    meanwhile health is NOT_SERVING and new work is refused; then the process exits 0."""
    with serve(tiny_checkpoint, env={"TOKENRM_MAX_WAIT_MS": "2000"}) as running:
        asyncio.run(_drain(running))
        assert running.process.wait(timeout=30) == 0
