"""Hostile input against a real `tokenrm serve` on 127.0.0.1, HTTP and gRPC, with small limits
(8 items, 64 KiB bodies and messages) so that generated input reaches them: property-based
fuzzing of POST /score and of the gRPC messages (hypothesis), cases generated from the server's
own /openapi.json with every check of schemathesis (the server's answers match its schema, and
the schema says what the server accepts), then slow-loris clients and oversized headers while
other callers score.

Every answer is 200 with well-formed results (one finite reward per response token) or a clear
4xx / INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the field and the limit: never a 5xx,
INTERNAL, UNKNOWN or a hang, and the server answers as before afterwards.

About 5100 cases (HTTP 2100, gRPC 1500, schemathesis 1500); the file takes about 1.5 minutes
on 2 cores, training the tiny model included. TOKENRM_FUZZ_EXAMPLES multiplies every
example count, e.g. `TOKENRM_FUZZ_EXAMPLES=10 pytest tests/test_hostile_input.py` for a longer
run. Generation is derandomized (the same cases on every run) and keeps no example database.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import random
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import schemathesis
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.engine import StopReason, from_schema
from schemathesis.engine import events as st_events

from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.launcher import serve

TIMEOUT = 10.0  # any answer slower than this is a hang
START_TIMEOUT = 180.0  # a server process to become ready: only a hang (the machine may be shared)
SERVICE = "tokenrm.v1.RewardService"
MAX_ITEMS = 8
MAX_BYTES = 64 * 1024  # HTTP body and gRPC message limit
LIMITS = {"TOKENRM_MAX_ITEMS_PER_REQUEST": str(MAX_ITEMS),
          "TOKENRM_MAX_BODY_BYTES": str(MAX_BYTES),
          "TOKENRM_GRPC_MAX_MESSAGE_BYTES": str(MAX_BYTES)}
SCALE = float(os.environ.get("TOKENRM_FUZZ_EXAMPLES", "1"))
COVERAGE = SCALE >= 1  # check that the cases reached every outcome (a shorter run may not)
FIELDS = ("prompt", "response", "prompt_ids", "response_ids", "spans")
ERROR_STATUS = {"bad_request": 400, "payload_too_large": 413, "invalid_input": 422}
BAD_GRPC = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE)


def fuzz(examples: int) -> settings:
    """`examples` (times TOKENRM_FUZZ_EXAMPLES) reproducible cases, however slow each is."""
    return settings(max_examples=max(1, round(examples * SCALE)), deadline=None,
                    derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# ---------------------------------------------------------------- the server


REFERENCE = {"items": [
    {"prompt": "Facts: Ana lives in Lima. Question: Where does Ana live?",
     "response": "Ana lives in Lima.", "spans": [[0, 3], [4, 9], [10, 12], [13, 18]]},
    {"prompt_ids": [5, 6, 7, 8], "response_ids": [30, 31, 32, 33, 34, 35, 36]},
], "return_tokens": True}


@dataclass(frozen=True)
class Target:
    url: str
    grpc_target: str
    process: subprocess.Popen[str]
    vocab: int          # token ids must be below this
    max_tokens: int     # per item, prompt included
    before: dict[str, Any]  # the answer to REFERENCE before any hostile input


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Target]:
    with serve(tiny_checkpoint, env=LIMITS, timeout_s=START_TIMEOUT) as running:
        info = httpx.get(f"{running.url}/v1/model", timeout=TIMEOUT).json()
        assert info["limits"]["max_items_per_request"] == MAX_ITEMS
        assert info["limits"]["max_body_bytes"] == MAX_BYTES
        before = httpx.post(f"{running.url}/score", json=REFERENCE, timeout=TIMEOUT)
        assert before.status_code == 200, before.text
        yield Target(running.url, running.grpc_target, running.process, info["vocab_size"],
                     info["limits"]["max_tokens_per_item"], before.json())


@pytest.fixture(scope="module")
def http(server: Target) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


# ---------------------------------------------------------------- JSON with raw tokens


@dataclass(frozen=True)
class Raw:
    """A JSON token written as is, e.g. NaN, Infinity, 1e999, -0, 1.0."""

    text: str


RAW_NUMBERS = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1.0", "-0",
                               "1E2", "0.5", "-0.0", "2e-400", "9" * 400]).map(Raw)


def to_json(value: object, ascii_only: bool) -> str:
    """JSON text of `value`; strings with lone surrogates come out as \\ud800 escapes with
    `ascii_only`, else as the surrogate itself (bytes that are not UTF-8, see `body_bytes`)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{to_json(str(k), ascii_only)}: {to_json(v, ascii_only)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(to_json(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)  # floats: NaN / Infinity as raw tokens


def body_bytes(value: object, ascii_only: bool) -> bytes:
    return to_json(value, ascii_only).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------- checking answers


Outcomes = collections.Counter  # outcome name -> cases, to show what the fuzzing reached


def is_int(x: object) -> bool:
    return type(x) is int


def number(x: object) -> object:
    """A JSON number as the server reads it (a Raw one too: 1.0 and 1e2 are integers)."""
    return json.loads(x.text) if isinstance(x, Raw) else x


def assert_clear_http_error(r: httpx.Response) -> dict[str, Any]:
    """A 400, 413 or 422 whose JSON error says what is wrong and where; returns the error."""
    assert r.status_code in (400, 413, 422), (r.status_code, r.text[:2000])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    code, message, item, field = error["code"], error["message"], error["item"], error["field"]
    assert ERROR_STATUS[code] == r.status_code, error
    assert isinstance(message, str) and message, error
    if r.status_code == 400:
        assert "not valid JSON" in message, error
    elif r.status_code == 413:
        assert str(MAX_BYTES) in message, error  # names the limit
    else:  # where: the item and field, or the body as a whole
        assert field is not None or item is not None or message.startswith("body"), error
        assert field is None or field in message, error
        assert item is None or f"items[{item}]" in message, error
        if field == "items" and "the limit is" in message:
            assert f"the limit is {MAX_ITEMS}" in message, error
    return error


def assert_well_formed_http(body: dict[str, Any], request: Any, vocab: int,
                            max_tokens: int) -> None:
    """A 200 answer: one result per item, one finite reward per response token, the sum as
    total, tokens / offsets / span rewards where asked for and consistent with the item."""
    results = body["results"]
    assert body["usage"]["items"] == len(results) >= 1
    n_total = 0
    for k, r in enumerate(results):
        n = len(r["rewards"])
        n_total += n
        assert 1 <= n <= max_tokens and len(r["token_ids"]) == n, r
        assert all(isinstance(x, float | int) and math.isfinite(x) for x in r["rewards"]), r
        assert math.isclose(r["total"], math.fsum(r["rewards"]), abs_tol=1e-4), r
        assert all(is_int(t) and 0 <= t < vocab for t in r["token_ids"]), r
        if not isinstance(request, dict):
            continue
        item, return_tokens = request["items"][k], request.get("return_tokens", False)
        assert (r["tokens"] is not None) == return_tokens, r
        if return_tokens:
            assert len(r["tokens"]) == n and all(isinstance(t, str) for t in r["tokens"]), r
        if item.get("prompt_ids") is not None or item.get("response_ids") is not None:
            assert r["token_ids"] == [number(t) for t in item["response_ids"]], (item, r)
            assert r["offsets"] is None and r["span_rewards"] is None, r
            continue
        if return_tokens:
            assert len(r["offsets"]) == n, r
            assert all(0 <= a <= b <= len(item["response"]) for a, b in r["offsets"]), r
        spans = item.get("spans")
        if spans is None:
            assert r["span_rewards"] is None, r
        else:
            assert len(r["span_rewards"]) == len(spans), r
            if spans:  # every token's reward lands in some span: the total is conserved
                assert math.isclose(sum(r["span_rewards"]), r["total"], abs_tol=1e-3), r
    assert n_total <= body["usage"]["tokens"] <= len(results) * max_tokens, body["usage"]


def valid_ids_request(request: Any, vocab: int, max_tokens: int) -> bool:
    """Whether `request` is certainly scorable: token-id items only, all in range."""
    if not isinstance(request, dict) or set(request) - {"items", "return_tokens"}:
        return False
    items = request.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        return False
    if "return_tokens" in request and type(request["return_tokens"]) is not bool:
        return False
    for item in items:
        if not isinstance(item, dict) or set(item) != {"prompt_ids", "response_ids"}:
            return False
        ids = [item["prompt_ids"], item["response_ids"]]
        if not all(isinstance(x, list) and all(is_int(t) and 0 <= t < vocab for t in x)
                   for x in ids):
            return False
        if not 1 <= len(item["response_ids"]) <= max_tokens:
            return False
    return True


def post_score(http: httpx.Client, body: bytes, server: Target, request: Any,
               outcomes: Outcomes, headers: dict[str, Any] | None = None,
               chunked: bool = False) -> httpx.Response:
    """POST the body; assert a well-formed 200 or a clear 4xx; count the outcome."""
    content: bytes | Iterator[bytes] = iter([body[:7], body[7:]]) if chunked else body
    r = http.post("/score", content=content,
                  headers={"content-type": "application/json"} if headers is None else headers)
    malformed = any((b < 0x20 and b != 0x09) or b == 0x7F
                    for value in (headers or {}).values() for b in value)
    if malformed:  # a control character in a header: refused by the HTTP parser itself
        assert (r.status_code, r.text) == (400, "Invalid HTTP request received."), r.text
        outcomes["400 malformed header"] += 1
    elif r.status_code == 200:
        assert_well_formed_http(r.json(), request, server.vocab, server.max_tokens)
        outcomes["200"] += 1
    else:
        error = assert_clear_http_error(r)
        outcomes[f"{r.status_code} {_label(error['field'])}"] += 1
    if malformed:
        pass
    elif len(body) > MAX_BYTES:
        assert r.status_code == 413, (len(body), r.status_code, r.text[:500])
    elif valid_ids_request(request, server.vocab, server.max_tokens):
        assert r.status_code == 200, (request, r.text[:2000])
    return r


def _label(field: str | None) -> str:
    """The field for counting: one of ours, `other` (an unknown one, named as sent) or `-`."""
    return "-" if not field else field if field in ("items", "return_tokens", *FIELDS) \
        else "other"


def report(name: str, outcomes: Outcomes) -> None:
    print(f"\n{name}: {sum(outcomes.values())} cases: {dict(outcomes.most_common())}")


# ---------------------------------------------------------------- HTTP strategies

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**100, -(10**300)]),
    st.floats(allow_nan=True, allow_infinity=True), RAW_NUMBERS,
    st.text(st.characters(exclude_categories=()), max_size=20),  # surrogates and NUL too
    st.sampled_from(["\ud800", "a\udfffb", "\udbff\udbff", "\x00", "\ufffe"]))
KEYS = st.one_of(st.sampled_from(["items", "return_tokens", *FIELDS]), st.text(max_size=8))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(KEYS, inner, max_size=6)), max_leaves=40)
WRONG_TYPES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(), RAW_NUMBERS, st.text(max_size=4),
    st.lists(st.none(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                     max_size=2))
TEXTS = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(exclude_categories=()), max_size=30),  # lone surrogates, NUL
    st.text(st.characters(codec="utf-8", categories=["L", "M", "N", "P", "Z", "S"]),
            min_size=1, max_size=300),
    st.sampled_from(["", " ", "\x00", "\n\t", "Ana lives in Lima.", "Köln. Łódź.", "🙂" * 40,
                     "\u202eevil\u202c", "a\u0301" * 50, "\u2028\u2029", "\ufeff", "\uffff",
                     "\ud800", "Ana\udfff lives",
                     "x" * 600, "Ana lives in Lima. " * 300, "w" * 70_000]))


def hostile_ids(vocab: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(max_value=-1), st.integers(min_value=vocab),
        st.sampled_from([vocab, vocab + 1, -1, 2**31, 2**63 - 1, 2**63, 2**64,
                         -(2**63) - 1, 10**30]),
        WRONG_TYPES)


def id_lists(vocab: int, max_tokens: int) -> st.SearchStrategy[list[Any]]:
    """Mostly in-range ids, of lengths around the per-item limit too; sometimes one is bad."""

    @st.composite
    def ids(draw: st.DrawFn) -> list[Any]:
        n = draw(st.one_of(st.integers(0, 12), st.sampled_from(
            [max_tokens - 1, max_tokens, max_tokens + 1, 3 * max_tokens, 5000])))
        rng = random.Random(draw(st.integers(0, 2**16)))
        out: list[Any] = [rng.randrange(vocab) for _ in range(n)]
        if out and draw(st.integers(0, 3)) == 0:
            out[draw(st.integers(0, n - 1))] = draw(hostile_ids(vocab))
        return out

    return ids()


@st.composite
def sorted_spans(draw: st.DrawFn, response: str) -> list[list[int]]:
    """Well formed: sorted, non-overlapping, inside the response (none for an empty one)."""
    if not response:
        return []
    cuts = sorted(draw(st.sets(st.integers(0, len(response)), min_size=2, max_size=12)))
    return [[a, b] for a, b in zip(cuts[::2], cuts[1::2], strict=False)]


@st.composite
def spans_for(draw: st.DrawFn, response: Any) -> Any:
    n = len(response) if isinstance(response, str) else 5
    kind = draw(st.sampled_from(["sorted", "sorted", "any", "arity", "types", "empty"]))
    if kind == "sorted" and n:
        return draw(sorted_spans("x" * n))
    if kind == "arity":
        return draw(st.lists(st.lists(st.integers(0, n), max_size=4), min_size=1, max_size=4))
    if kind == "types":
        return draw(st.one_of(WRONG_TYPES, st.lists(
            st.lists(st.one_of(st.integers(0, n), WRONG_TYPES), min_size=2, max_size=2),
            min_size=1, max_size=3)))
    if kind == "empty":
        return []
    edge = st.one_of(st.integers(-3, n + 3), st.sampled_from([2**63, -(2**63) - 1, 10**40]))
    return draw(st.lists(st.tuples(edge, edge).map(list), min_size=1, max_size=6))


def json_items(vocab: int, max_tokens: int) -> st.SearchStrategy[Any]:
    ids = id_lists(vocab, max_tokens)

    @st.composite
    def item(draw: st.DrawFn) -> Any:
        form = draw(st.sampled_from(["text", "text", "text", "ids", "ids", "ids", "both",
                                     "partial", "empty", "not an object"]))
        if form == "not an object":
            return draw(st.one_of(st.none(), st.integers(), st.text(max_size=5),
                                  st.lists(st.integers(0, 9), max_size=3)))
        out: dict[str, Any] = {}
        if form in ("text", "both"):
            out["prompt"], out["response"] = draw(TEXTS), draw(TEXTS)
            if draw(st.integers(0, 2)) == 0:
                out["spans"] = draw(spans_for(out["response"]))
        if form in ("ids", "both"):
            out["prompt_ids"], out["response_ids"] = draw(ids), draw(ids)
        if form == "partial":
            for name in draw(st.sets(st.sampled_from(FIELDS), min_size=1, max_size=3)):
                out[name] = draw(TEXTS if name in ("prompt", "response") else ids)
        if draw(st.integers(0, 5)) == 0:  # spoil one field: a wrong type, null or extra
            name = draw(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)))
            out[name] = draw(WRONG_TYPES)
        return out

    return item()


CLEAN_TEXTS = st.text(st.characters(codec="utf-8", categories=["L", "M", "N", "P", "Zs"]),
                      min_size=1, max_size=120)


def clean_items(vocab: int, max_tokens: int) -> st.SearchStrategy[Any]:
    """Items of the right shape and types (a text response may still tokenize to nothing)."""

    @st.composite
    def item(draw: st.DrawFn) -> Any:
        if draw(st.booleans()):
            out = {"prompt": draw(st.one_of(st.just(""), CLEAN_TEXTS)),
                   "response": draw(CLEAN_TEXTS)}
            if draw(st.booleans()):
                out["spans"] = draw(sorted_spans(out["response"]))
            return out
        rng = random.Random(draw(st.integers(0, 2**16)))
        n = draw(st.one_of(st.integers(1, 20), st.integers(1, max_tokens)))
        return {"prompt_ids": [rng.randrange(vocab) for _ in range(draw(st.integers(0, 40)))],
                "response_ids": [rng.randrange(vocab) for _ in range(n)]}

    return item()


def score_requests(vocab: int, max_tokens: int) -> st.SearchStrategy[Any]:
    """A third of the requests are clean (to reach scoring); the rest are hostile."""
    items, clean = json_items(vocab, max_tokens), clean_items(vocab, max_tokens)

    @st.composite
    def request(draw: st.DrawFn) -> Any:
        if draw(st.integers(0, 2)) == 0:
            n = draw(st.integers(1, MAX_ITEMS))
            return {"items": draw(st.lists(clean, min_size=n, max_size=n)),
                    "return_tokens": draw(st.booleans())}
        n = draw(st.one_of(st.integers(1, 3), st.integers(0, MAX_ITEMS + 4)))
        out: dict[str, Any] = {"items": draw(st.lists(items, min_size=n, max_size=n))}
        if draw(st.booleans()):
            out["return_tokens"] = draw(st.one_of(st.booleans(), st.booleans(), WRONG_TYPES))
        spoil = draw(st.integers(0, 9))
        if spoil == 0:
            out[draw(st.text(max_size=8))] = draw(WRONG_TYPES)
        elif spoil == 1:
            out["items"] = draw(WRONG_TYPES)
        elif spoil == 2:
            del out["items"]
        return out

    return request()


# ---------------------------------------------------------------- 1. HTTP /score


def test_http_arbitrary_json_bodies_are_refused_clearly(server: Target, http: httpx.Client
                                                        ) -> None:
    outcomes: Outcomes = collections.Counter()

    @fuzz(500)
    @given(value=JSON_VALUES, ascii_only=st.booleans())
    def check(value: Any, ascii_only: bool) -> None:
        post_score(http, body_bytes(value, ascii_only), server, value, outcomes)

    check()
    report("HTTP arbitrary JSON", outcomes)
    if COVERAGE:
        assert {"400 -", "422 -", "422 items"} <= set(outcomes), outcomes


def test_http_hostile_score_requests_get_results_or_a_clear_4xx(server: Target,
                                                                http: httpx.Client) -> None:
    outcomes: Outcomes = collections.Counter()

    @fuzz(1200)
    @given(request=score_requests(server.vocab, server.max_tokens), ascii_only=st.booleans())
    def check(request: Any, ascii_only: bool) -> None:
        post_score(http, body_bytes(request, ascii_only), server, request, outcomes)

    check()
    report("HTTP ScoreRequest", outcomes)
    cases = sum(outcomes.values())
    if COVERAGE:  # the fuzzing reached scoring, both size limits and every field's checks
        assert outcomes["200"] >= cases // 20, outcomes
        assert outcomes["413 -"] > 0 and outcomes["400 -"] > 0, outcomes
        fields = {key.split()[1] for key in outcomes if key.startswith("422")}
        assert {"items", *FIELDS} <= fields, outcomes


def test_http_numbers_with_a_zero_fraction_are_integers(http: httpx.Client) -> None:
    """JSON Schema (and so /openapi.json) takes 7.0 and 1e1 for integers: so does the server;
    7.5 is not one."""
    ints = http.post("/score", json={"items": [
        {"prompt_ids": [5, 6], "response_ids": [7, 10]},
        {"prompt": "a", "response": "Ana lives", "spans": [[0, 3], [4, 9]]}]}).json()
    floats = http.post("/score", content=b'{"items": [{"prompt_ids": [5.0, 6], "response_ids": '
                       b'[7.0, 1e1]}, {"prompt": "a", "response": "Ana lives", "spans": '
                       b'[[0.0, 3], [4, 9e0]]}]}', headers={"content-type": "application/json"})
    assert floats.status_code == 200, floats.text
    assert floats.json()["results"] == ints["results"]
    r = http.post("/score", json={"items": [{"prompt_ids": [5.0], "response_ids": [7.5]}]})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {
        "code": "invalid_input", "message": "items[0].response_ids[0]: Input should be a valid "
        "integer", "item": 0, "field": "response_ids"}


def _valid_body(size: int) -> bytes:
    """A valid request padded with whitespace to exactly `size` bytes."""
    body = json.dumps({"items": [{"prompt_ids": [5, 6], "response_ids": [7, 8, 9]}]}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


PREFIXES = [b'{"items": [', b'{"items": [{"prompt": "a", "response": "b"}]}',
            b'\xef\xbb\xbf{"items": [{"prompt": "a", "response": "b"}]}',
            b'{"items": [{"prompt": "\\ud800", "response": "b"}]}',
            b'{"items": [{"prompt": "a", "response": "\\udfff\\ud800"}]}',
            b'{"items": [{"prompt": "a", "response": "b\\u0000c"}]}',
            b'{"items": [], "items": [{"prompt_ids": [1], "response_ids": [2]}]}',
            b'{"items": [{"prompt": "a", "response": "b", "prompt": 3}]}',
            b'{"items": [{"prompt_ids": [1], "response_ids": [2]}]} trailing',
            b'{"items": [{"prompt": "a", "response": "\xed\xa0\x80"}]}',
            b'{"items": [{"prompt_ids": [1], "response_ids": [01]}]}',
            b"[" * 20_000 + b"]" * 20_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
            b"\x00" * 100, b"null", b'"items"', b"", b" ", b"\r\n"]
CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from([b"application/json", b"text/plain", b"application/octet-stream",
                     b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x",
                     b"application/json; charset=latin-1", b"application/json; charset=utf-16",
                     b"application/xml", b"*/*", b"application/json\xff", b";;;;",
                     b"application/json\x01"]),
    st.binary(min_size=1, max_size=40).filter(
        lambda v: not set(v) & set(b"\r\n\x00") and v.strip() == v))


@st.composite
def raw_bodies(draw: st.DrawFn) -> tuple[bytes, Any]:
    """(body, the request it is when it is a known one)."""
    kind = draw(st.sampled_from(["bytes", "prefix", "prefix", "sized", "big"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400)), None
    if kind == "prefix":
        return draw(st.sampled_from(PREFIXES)) + draw(st.binary(max_size=20)), None
    if kind == "sized":  # a valid request right at the body limit: in, or one byte over
        size = draw(st.sampled_from([100, MAX_BYTES - 1, MAX_BYTES, MAX_BYTES + 1]))
        return _valid_body(size), json.loads(_valid_body(size))
    return draw(st.sampled_from([b"x", b"{", b"\xff"])) * draw(
        st.sampled_from([MAX_BYTES + 1, 3 * MAX_BYTES, 1 << 20])), None


def test_http_raw_bodies_and_wrong_content_types(server: Target, http: httpx.Client) -> None:
    outcomes: Outcomes = collections.Counter()

    @fuzz(400)
    @given(body=raw_bodies(), content_type=CONTENT_TYPES, chunked=st.booleans())
    def check(body: tuple[bytes, Any], content_type: bytes | None, chunked: bool) -> None:
        data, request = body
        headers = {} if content_type is None else {"content-type": content_type}
        if content_type not in (None, b"application/json"):
            request = None  # a 415 would do as well as an answer
        try:
            r = post_score(http, data, server, request, outcomes, headers, chunked)
        except httpx.LocalProtocolError:  # a header value this client will not send
            reject()
        if request is not None and len(data) <= MAX_BYTES:
            assert r.status_code == 200, r.text  # right at the limit too

    check()
    report("HTTP raw bodies", outcomes)
    if COVERAGE:
        assert {"200", "400 -", "413 -"} <= set(outcomes), outcomes


# ---------------------------------------------------------------- 2. gRPC

GRPC_TEXTS = st.one_of(
    st.text(max_size=30), st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]),
                                  min_size=1, max_size=200),
    st.sampled_from(["", " ", "\x00", "Ana lives in Lima.", "Köln. Łódź.", "🙂" * 40,
                     "\u202eevil\u202c", "x" * 600, "Ana lives in Lima. " * 300,
                     "w" * 70_000]))
INT64 = st.integers(-(2**63), 2**63 - 1)


def pb_requests(vocab: int, max_tokens: int) -> st.SearchStrategy[pb.ScoreRequest]:
    hostile = st.one_of(INT64, st.sampled_from([vocab, -1, 2**63 - 1, -(2**63)]))

    @st.composite
    def ids(draw: st.DrawFn) -> list[int]:
        n = draw(st.one_of(st.integers(0, 12), st.sampled_from(
            [max_tokens, max_tokens + 1, 3 * max_tokens, 9000])))
        rng = random.Random(draw(st.integers(0, 2**16)))
        out = [rng.randrange(vocab) for _ in range(n)]
        if out and draw(st.integers(0, 3)) == 0:
            out[draw(st.integers(0, n - 1))] = draw(hostile)
        return out

    @st.composite
    def item(draw: st.DrawFn) -> pb.Item:
        form = draw(st.sampled_from(["text", "text", "ids", "ids", "both", "partial", "empty"]))
        m = pb.Item()
        if form in ("text", "both") or (form == "partial" and draw(st.booleans())):
            m.prompt = draw(GRPC_TEXTS)
        if form in ("text", "both") or (form == "partial" and draw(st.booleans())):
            m.response = draw(GRPC_TEXTS)
        if form in ("ids", "both") or (form == "partial" and draw(st.booleans())):
            m.prompt_ids.extend(draw(ids()))
        if form in ("ids", "both") or (form == "partial" and draw(st.booleans())):
            m.response_ids.extend(draw(ids()))
        if draw(st.integers(0, 2)) == 0:
            n = len(m.response)
            spans = draw(spans_for(m.response if m.HasField("response") else None))
            if not (isinstance(spans, list) and all(
                    isinstance(s, list) and len(s) == 2 and all(map(is_int, s))
                    and all(-(2**63) <= x < 2**63 for x in s) for s in spans)):
                spans = draw(st.lists(st.tuples(st.integers(-2, n + 2), INT64), max_size=3))
            m.spans.extend(pb.Span(start=a, end=b) for a, b in spans)
        return m

    def clean(item: dict[str, Any]) -> pb.Item:
        spans = [pb.Span(start=a, end=b) for a, b in item.pop("spans", [])]
        return pb.Item(**item, spans=spans)

    clean_items_ = clean_items(vocab, max_tokens).map(clean)

    @st.composite
    def request(draw: st.DrawFn) -> pb.ScoreRequest:
        """A third clean (to reach scoring), the rest hostile."""
        if draw(st.integers(0, 2)) == 0:
            n, items = draw(st.integers(1, MAX_ITEMS)), clean_items_
        else:
            n, items = draw(st.one_of(st.integers(1, 3), st.integers(0, MAX_ITEMS + 4))), item()
        return pb.ScoreRequest(items=draw(st.lists(items, min_size=n, max_size=n)),
                               return_tokens=draw(st.booleans()))

    return request()


def _is_text(m: pb.Item) -> bool:
    return m.HasField("prompt") or m.HasField("response")


def valid_ids_message(request: pb.ScoreRequest, vocab: int, max_tokens: int) -> bool:
    return 1 <= len(request.items) <= MAX_ITEMS and all(
        not _is_text(m) and not m.spans and 1 <= len(m.response_ids) <= max_tokens
        and all(0 <= t < vocab for t in [*m.prompt_ids, *m.response_ids])
        for m in request.items)


def assert_well_formed_grpc(answer: pb.ScoreResponse, request: pb.ScoreRequest, vocab: int,
                            max_tokens: int) -> None:
    assert not answer.HasField("error"), answer.error
    assert len(answer.results) == len(request.items) == answer.usage.items
    for m, r in zip(request.items, answer.results, strict=True):
        n = len(r.rewards)
        assert 1 <= n <= max_tokens and len(r.token_ids) == n, r
        assert np.isfinite(np.array(r.rewards)).all(), r
        assert math.isclose(r.total, math.fsum(r.rewards), abs_tol=1e-4), r
        assert all(0 <= t < vocab for t in r.token_ids), r
        assert len(r.tokens) == (n if request.return_tokens else 0), r
        if _is_text(m):
            assert len(r.offsets) == (2 * n if request.return_tokens else 0), r
            assert len(r.span_rewards) == len(m.spans), r
            if m.spans:
                assert math.isclose(sum(r.span_rewards), r.total, abs_tol=1e-3), r
        else:
            assert list(r.token_ids) == list(m.response_ids), r
            assert not r.offsets and not r.span_rewards, r


def assert_clear_grpc_error(error: grpc.RpcError, size: int) -> str:
    """INVALID_ARGUMENT naming where, or RESOURCE_EXHAUSTED naming the limit; returns a label."""
    code, details = error.code(), error.details() or ""
    assert code not in BAD_GRPC, (code, details)
    metadata = dict(error.trailing_metadata() or ())
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if size > MAX_BYTES:  # refused by gRPC itself, before the servicer
            assert "Received message larger than max" in details, details
        else:
            assert metadata.get("tokenrm-error-code") == "payload_too_large", (details, metadata)
            assert f"limit of {MAX_BYTES}" in details, details
        return "RESOURCE_EXHAUSTED"
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    kind = metadata.get("tokenrm-error-code")
    if kind == "bad_request":
        assert "not a valid tokenrm.v1.ScoreRequest" in details, details
        return "INVALID_ARGUMENT bad_request"
    assert kind == "invalid_input", (details, metadata)
    assert details.startswith("items"), details
    field, item = metadata.get("tokenrm-field"), metadata.get("tokenrm-item")
    assert field is None or field in details, (details, metadata)
    assert item is None or details.startswith(f"items[{item}]"), (details, metadata)
    if field == "items" and "the limit is" in details:
        assert f"the limit is {MAX_ITEMS}" in details, details
    return f"INVALID_ARGUMENT {_label(field)}"


@st.composite
def wire_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid request's bytes flipped, cut, spliced or repeated."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    valid = pb.ScoreRequest(items=[
        pb.Item(prompt="Ana lives", response="in Lima.", spans=[pb.Span(start=0, end=2)]),
        pb.Item(prompt_ids=[5, 6], response_ids=[7, 8, 9])], return_tokens=True)
    data = bytearray(valid.SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        if how == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[at:at + draw(st.integers(1, 8))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += bytes(data[:at])
    return bytes(data)


def test_grpc_random_bytes_are_invalid_argument(server: Target, channel: grpc.Channel) -> None:
    score = channel.unary_unary(f"/{SERVICE}/Score")  # identity serializers: bytes as they are
    outcomes: Outcomes = collections.Counter()

    @fuzz(500)
    @given(data=wire_bytes())
    def check(data: bytes) -> None:
        try:
            decoded: pb.ScoreRequest | None = pb.ScoreRequest.FromString(data)
        except DecodeError:  # as the server sees it too
            decoded = None
        try:
            answer = pb.ScoreResponse.FromString(score(data, timeout=TIMEOUT))
        except grpc.RpcError as error:
            label = assert_clear_grpc_error(error, len(data))
            if decoded is None:
                assert label == "INVALID_ARGUMENT bad_request", label
            outcomes[label] += 1
        else:
            assert decoded is not None, data  # an undecodable message was scored
            assert_well_formed_grpc(answer, decoded, server.vocab, server.max_tokens)
            outcomes["OK"] += 1

    check()
    report("gRPC bytes", outcomes)
    if COVERAGE:
        assert outcomes["INVALID_ARGUMENT bad_request"] >= sum(outcomes.values()) // 4, outcomes


def _grpc_call(stub: pb_grpc.RewardServiceStub, request: pb.ScoreRequest, server: Target,
               outcomes: Outcomes) -> tuple[str, pb.ScoreResponse | None]:
    """Score; assert a well-formed answer or a clear error; returns (label, answer)."""
    size = request.ByteSize()
    try:
        answer = stub.Score(request, timeout=TIMEOUT)
    except grpc.RpcError as error:
        label, answer = assert_clear_grpc_error(error, size), None
        if size > MAX_BYTES:
            assert label == "RESOURCE_EXHAUSTED", label
        else:
            assert not valid_ids_message(request, server.vocab, server.max_tokens), label
    else:
        assert size <= MAX_BYTES, size
        assert_well_formed_grpc(answer, request, server.vocab, server.max_tokens)
        label = "OK"
    outcomes[label] += 1
    return label, answer


def test_grpc_hostile_messages_get_results_or_a_clear_status(
        server: Target, stub: pb_grpc.RewardServiceStub) -> None:
    outcomes: Outcomes = collections.Counter()

    @fuzz(900)
    @given(request=pb_requests(server.vocab, server.max_tokens))
    def check(request: pb.ScoreRequest) -> None:
        _grpc_call(stub, request, server, outcomes)

    check()
    report("gRPC ScoreRequest", outcomes)
    cases = sum(outcomes.values())
    if COVERAGE:
        assert outcomes["OK"] >= cases // 20 and outcomes["RESOURCE_EXHAUSTED"] > 0, outcomes
        fields = {key.split()[1] for key in outcomes if key.startswith("INVALID_ARGUMENT")}
        assert {"items", *FIELDS} <= fields, outcomes


def test_grpc_stream_answers_hostile_requests_like_unary_calls(
        server: Target, stub: pb_grpc.RewardServiceStub) -> None:
    """Each request of a stream gets the answer, or the error, that it gets alone."""
    outcomes: Outcomes = collections.Counter()
    requests_ = st.lists(pb_requests(server.vocab, server.max_tokens).filter(
        lambda r: r.ByteSize() <= MAX_BYTES), min_size=1, max_size=4)

    @fuzz(60)
    @given(batch=requests_)
    def check(batch: list[pb.ScoreRequest]) -> None:
        answers = list(stub.ScoreStream(iter(batch), timeout=TIMEOUT))
        assert len(answers) == len(batch)
        for request, answer in zip(batch, answers, strict=True):
            try:
                alone = stub.Score(request, timeout=TIMEOUT)
            except grpc.RpcError as error:
                metadata = dict(error.trailing_metadata() or ())
                assert answer.HasField("error") and not answer.results, answer
                assert (answer.error.code, answer.error.field, answer.error.message) == (
                    metadata["tokenrm-error-code"], metadata.get("tokenrm-field", ""),
                    error.details())
                assert ERROR_STATUS.get(answer.error.code), answer.error
                outcomes[f"error {answer.error.code}"] += 1
            else:
                assert_well_formed_grpc(answer, request, server.vocab, server.max_tokens)
                for a, b in zip(answer.results, alone.results, strict=True):
                    assert list(a.token_ids) == list(b.token_ids)
                    np.testing.assert_allclose(a.rewards, b.rewards, rtol=0, atol=1e-5)
                outcomes["OK"] += 1

    check()
    report("gRPC ScoreStream requests", outcomes)
    if COVERAGE:
        assert outcomes["OK"] > 0 and outcomes["error invalid_input"] > 0, outcomes


# ---------------------------------------------------------------- 3. schemathesis

ST_EXAMPLES = 400       # fuzzing cases per operation, besides its examples and coverage cases
ST_KEYED_EXAMPLES = 40  # the same, in the run against a server with API keys
API_KEY = "hostile-test-key"
load_all_checks()
ALL_CHECKS = {*CHECKS.get_all_names(), "max_response_time"}  # the latter: when given a limit


def unstated_rules(max_tokens: int) -> Callable[[Any, schemathesis.Case], schemathesis.Case]:
    """A `map_case` hook: a positive case made to keep the rules that JSON Schema cannot state
    (and the server's schema describes in words), so that a refusal is a real mismatch.

    - spans: sorted, not overlapping, inside the response (relations between values): each
      text item's spans become consecutive spans between the cut points drawn;
    - a text response of at most max_tokens tokens (tokens, not characters): cut to
      max_tokens // 4 characters (byte-level BPE: at most 4 tokens a character);
    - /get_reward: a prompt per query, each query its prompt then a response of at least one
      token (a relation between the two lists).

    Negative cases are left as drawn: they must break the schema, and be refused."""
    chars = max_tokens // 4

    def map_case(context: Any, case: schemathesis.Case) -> schemathesis.Case:
        body: Any = case.body
        if case.meta is None or not case.meta.generation.mode.is_positive or \
                not isinstance(body, dict):
            return case
        if case.operation.label == "POST /score":
            for item in body["items"]:
                if isinstance(item.get("response"), str):
                    item["response"] = item["response"][:chars]
                    if item.get("spans"):
                        n = len(item["response"])
                        cuts = sorted({min(x, n) for span in item["spans"] for x in span})
                        item["spans"] = [list(pair) for pair in itertools.pairwise(cuts)]
        elif case.operation.label == "POST /get_reward":
            queries = body["query"]
            prompts = (body["prompts"] + [""] * len(queries))[:len(queries)]
            body["prompts"] = prompts
            body["query"] = [p + (q[:chars] or "x") for p, q in zip(prompts, queries, strict=True)]
        return case

    return map_case


def schemathesis_config(examples: int, **extra: Any) -> schemathesis.Config:
    """What `st run --checks all --max-response-time 10` does: every phase (examples, coverage,
    fuzzing; stateful finds no links to follow here), positive and negative cases, every
    check; derandomized, no example database."""
    return schemathesis.Config.from_dict({
        "workers": 1, "continue-on-failure": True, "request-timeout": TIMEOUT,
        "checks": {"enabled": True, "max_response_time": TIMEOUT},
        "phases": {"enabled": True},
        "generation": {"max-examples": max(1, round(examples * SCALE)), "mode": "all",
                       "deterministic": True, "database": "none"},
        **extra})


@dataclass
class SchemathesisRun:
    outcomes: Outcomes       # "phase operation mode status" -> cases
    checks_run: set[str]     # names of the checks that ran
    failures: list[str]
    errors: list[str]        # the engine's own (a schema it could not use, a lost connection)


def run_schemathesis(schema: Any, max_tokens: int) -> SchemathesisRun:
    """Run schemathesis's engine (what `st run` runs) over `schema`; what it found."""
    schema.hook("map_case")(unstated_rules(max_tokens))
    run = SchemathesisRun(collections.Counter(), set(), [], [])
    for event in from_schema(schema).execute():
        if isinstance(event, st_events.ScenarioFinished):
            recorder = event.recorder
            for case_id, node in recorder.cases.items():
                case, interaction = node.value, recorder.interactions.get(case_id)
                mode = case.meta.generation.mode.value if case.meta else "-"
                status = interaction.response.status_code \
                    if interaction and interaction.response else "no answer"
                run.outcomes[f"{event.phase.value} {recorder.label} {mode} {status}"] += 1
                for check in recorder.checks.get(case_id, []):
                    run.checks_run.add(check.name)
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        run.failures.append(f"{recorder.label} {check.name}: {failure.title}: "
                                            f"{failure.message}\n  body {case.body!r:.500}\n  "
                                            f"answer {status}")
        elif isinstance(event, st_events.NonFatalError):
            run.errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, st_events.FatalError):
            run.errors.append(repr(event.exception))
        elif isinstance(event, st_events.EngineFinished) and \
                event.stop_reason != StopReason.COMPLETED:
            run.errors.append(f"stopped: {event.stop_reason}")
    return run


def dangling_refs(spec: dict[str, Any]) -> set[str]:
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    return refs - set(spec["components"]["schemas"])


def assert_clean_run(run: SchemathesisRun, name: str) -> None:
    report(name, run.outcomes)
    assert not run.errors, run.errors
    assert not run.failures, f"{len(run.failures)} failures:\n" + "\n".join(run.failures[:10])
    assert run.checks_run == ALL_CHECKS, ALL_CHECKS - run.checks_run


def test_schemathesis_with_all_checks_finds_nothing(server: Target) -> None:
    """Every check of schemathesis, in every phase, over the server's own /openapi.json: no
    5xx; documented statuses, content types, headers and bodies; every schema-valid request
    accepted (positive_data_acceptance, with `unstated_rules`) and every schema-invalid one
    refused (negative_data_rejection); unsupported methods get 405 with Allow; no answer
    slower than TIMEOUT. The checks of stateful APIs (use_after_free,
    ensure_resource_availability, object_level_authorization) run and have nothing to find:
    no request here creates or deletes anything, or belongs to one caller. The auth checks:
    the next test."""
    spec = httpx.get(f"{server.url}/openapi.json", timeout=TIMEOUT).json()
    assert not dangling_refs(spec), dangling_refs(spec)  # parts of it would go untested
    schemas = spec["components"]["schemas"]  # this server's limits, as GET /v1/model tells them
    assert schemas["ScoreRequest"]["properties"]["items"]["maxItems"] == MAX_ITEMS
    ids = schemas["IdsItem"]["properties"]["response_ids"]
    assert (ids["maxItems"], ids["items"]["maximum"]) == (server.max_tokens, server.vocab - 1)
    run = run_schemathesis(schemathesis.openapi.from_dict(
        spec, config=schemathesis_config(ST_EXAMPLES, **{"base-url": server.url})),
        server.max_tokens)
    assert_clean_run(run, "schemathesis")
    cases = sum(run.outcomes.values())
    assert cases >= 1000 * min(SCALE, 1), cases
    if COVERAGE:  # scored, and refused, in each operation that takes input
        for op in ("POST /score", "POST /get_reward"):
            for mode, status in (("positive", 200), ("negative", 422), ("negative", 400)):
                assert any(k.endswith(f"{op} {mode} {status}") for k in run.outcomes), \
                    (op, mode, status, run.outcomes)


def with_api_keys(spec: dict[str, Any]) -> dict[str, Any]:
    """The schema a server with TOKENRM_API_KEYS would publish, if it published one (it does
    not, see app.py): every route but /healthz needs `Authorization: Bearer <key>`."""
    spec = json.loads(json.dumps(spec))
    spec["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    spec["security"] = [{"apiKey": []}]
    spec["paths"]["/healthz"]["get"]["security"] = []
    return spec


def test_schemathesis_with_all_checks_on_a_server_with_api_keys(server: Target,
                                                                 tiny_checkpoint: Path) -> None:
    """The same, against a server with an API key, its routes declared to need it: the auth
    checks (ignored_auth: each route refuses a call without the key, or with a wrong one;
    missing_required_header: 401 without it) have something to check too."""
    spec = with_api_keys(httpx.get(f"{server.url}/openapi.json", timeout=TIMEOUT).json())
    with serve(tiny_checkpoint, env={**LIMITS, "TOKENRM_API_KEYS": API_KEY},
               timeout_s=START_TIMEOUT) as keyed:
        config = schemathesis_config(ST_KEYED_EXAMPLES, **{"base-url": keyed.url, "auth": {
            "openapi": {"apiKey": {"bearer": API_KEY}}}})
        run = run_schemathesis(schemathesis.openapi.from_dict(spec, config=config),
                               server.max_tokens)
    assert_clean_run(run, "schemathesis with an API key")
    if COVERAGE:
        assert any(k.endswith(" 401") for k in run.outcomes), run.outcomes
        assert any(k.endswith("POST /score positive 200") for k in run.outcomes), run.outcomes


# ---------------------------------------------------------------- 4. still serving


def _requests_total(http: httpx.Client) -> dict[tuple[str, str], float]:
    """tokenrm_requests_total by (transport, code), from GET /metrics."""
    metrics = http.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    counts = {}
    for labels, value in re.findall(r"^tokenrm_requests_total\{(.*)\} (\S+)$", metrics.text,
                                    re.M):
        named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counts[named["transport"], named["code"]] = float(value)
    return counts


def test_the_server_survived_and_answers_as_before(server: Target, http: httpx.Client,
                                                   channel: grpc.Channel,
                                                   stub: pb_grpc.RewardServiceStub) -> None:
    """Alive, ready, the same rewards as before whatever ran first (the fuzzing, when the whole
    file runs), and every outcome counted: one request of each kind here moves its counter of
    tokenrm_requests_total by exactly one."""
    assert server.process.poll() is None, "the server process died"
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json()["status"] == "ready"
    counted = _requests_total(http)
    after = http.post("/score", json=REFERENCE)
    assert after.status_code == 200, after.text
    before, now = server.before["results"], after.json()["results"]
    for a, b in zip(before, now, strict=True):
        assert (a["token_ids"], a["tokens"], a["offsets"]) == \
            (b["token_ids"], b["tokens"], b["offsets"])
        np.testing.assert_allclose(a["rewards"], b["rewards"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(a["span_rewards"] or [], b["span_rewards"] or [], atol=1e-6)
    grpc_ids = stub.Score(pb.ScoreRequest(items=[pb.Item(**REFERENCE["items"][1])]),
                          timeout=TIMEOUT)
    np.testing.assert_allclose(grpc_ids.results[0].rewards, before[1]["rewards"], atol=1e-6)

    refused = {  # one request the server refuses for each reason
        "bad_request": http.post("/score", content=b"{not json",
                                 headers={"content-type": "application/json"}),
        "payload_too_large": http.post("/score", content=_valid_body(MAX_BYTES + 1),
                                       headers={"content-type": "application/json"}),
        "invalid_input": http.post("/score", json={"items": []})}
    for code, r in refused.items():
        assert r.status_code == ERROR_STATUS[code], (code, r.text)
        assert r.json()["error"]["code"] == code, r.text
    score_bytes = channel.unary_unary(f"/{SERVICE}/Score")  # bytes as they are
    for code, call in (("bad_request", lambda: score_bytes(b"\xff\xff\xff", timeout=TIMEOUT)),
                       ("invalid_input", lambda: stub.Score(pb.ScoreRequest(),
                                                            timeout=TIMEOUT))):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value
        assert dict(error.value.trailing_metadata() or ())["tokenrm-error-code"] == code

    now_counted = _requests_total(http)
    moved = {key: now_counted.get(key, 0) - counted.get(key, 0)
             for key in {*counted, *now_counted}}
    assert {key: n for key, n in moved.items() if n} == {
        **{("http", code): 1 for code in ("ok", *ERROR_STATUS)},
        **{("grpc", code): 1 for code in ("ok", "bad_request", "invalid_input")}}, moved


# ---------------------------------------------------------------- 5. slow clients, big headers

ATTACK_S = 8.0  # how long the slow clients trickle while others call
STALL_S = ATTACK_S / 2  # a call held this long is stalled: ~100x a call's usual 20-40 ms


def _port(url_or_target: str) -> int:
    return int(url_or_target.rsplit(":", 1)[1])


@dataclass(frozen=True)
class RawAnswer:
    status: int | None        # None: the connection closed without an answer
    headers: dict[str, str]   # names in lower case
    body: bytes
    sent_all: bool            # False: the server closed the connection before taking it all


def _answer(request: bytes, port: int, timeout: float = TIMEOUT) -> RawAnswer:
    """Send a raw request on a connection of its own, then read until the server closes it.
    An answer the server wrote before closing is read even when the close cut the request
    short (it waits in the socket's receive queue). A server that neither answers nor closes
    within `timeout` fails the test (socket.timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(request)
            sent_all = True
        except (ConnectionResetError, BrokenPipeError):
            sent_all = False
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass  # after what it wrote: unread request bytes make the close a reset
    if not data:
        return RawAnswer(None, {}, b"", sent_all)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return RawAnswer(int(lines[0].split(" ", 2)[1]), headers, body, sent_all)


def _status(request: bytes, port: int, timeout: float = TIMEOUT) -> int | None:
    """The status code of the answer to a raw request (None: closed without one)."""
    return _answer(request, port, timeout).status


def assert_headers_too_large(answer: RawAnswer) -> None:
    """As RELIABILITY.md has it: 431 with a JSON error `headers_too_large` naming the limit,
    then the connection closes (`_answer` read up to the close)."""
    assert answer.status == 431, answer
    assert answer.headers.get("connection") == "close", answer.headers
    assert answer.headers.get("content-type") == "application/json", answer.headers
    assert int(answer.headers["content-length"]) == len(answer.body), answer
    error = json.loads(answer.body)["error"]
    assert (error["code"], error["field"], error["item"]) == \
        ("headers_too_large", "headers", None), error
    assert str(64 * 1024) in error["message"], error


def oversized_headers() -> dict[str, bytes]:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    body = json.dumps({"items": [{"prompt_ids": [5], "response_ids": [7, 8]}]}).encode()
    return {
        "64 KiB header value": head + b"X-Big: " + b"a" * (64 * 1024 + 1) + b"\r\n\r\n",
        "1 MiB header value": head + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
        "10000 headers": head + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + b"\r\n",
        "64 KiB header on /score": b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nX-Big: %s\r\n\r\n%s"
        % (len(body), b"b" * (64 * 1024 + 1), body),
        "64 KiB URL": b"GET /healthz?" + b"q" * (64 * 1024) + b" HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\n\r\n",
    }


@dataclass
class Trickle:
    """Sockets that each send one byte every `every_s`: the start of a request header and
    then one header byte at a time, or whole headers and a body one byte at a time; and
    sockets to the gRPC port that send the HTTP/2 preface a byte at a time."""

    server: Target
    header_clients: int = 50
    body_clients: int = 10
    grpc_clients: int = 10
    every_s: float = 0.5
    closed_by_server: int = 0
    sockets: list[socket.socket] | None = None

    def open(self) -> None:
        http, grpc_port = _port(self.server.url), _port(self.server.grpc_target)
        self.sockets = []
        for k in range(self.header_clients + self.body_clients + self.grpc_clients):
            s = socket.create_connection(
                ("127.0.0.1", http if k < self.header_clients + self.body_clients else grpc_port),
                timeout=TIMEOUT)
            if k < self.header_clients:
                s.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            elif k < self.header_clients + self.body_clients:
                s.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n")
            self.sockets.append(s)

    def run(self, until: float) -> None:
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        step = 0
        while time.monotonic() < until:
            for k, s in enumerate(list(self.sockets or [])):
                byte = (preface[step % len(preface):step % len(preface) + 1]
                        if k >= self.header_clients + self.body_clients else b"a")
                try:
                    s.send(byte)
                except OSError:
                    self.closed_by_server += 1
                    assert self.sockets is not None
                    self.sockets.remove(s)
            step += 1
            time.sleep(self.every_s)

    def close(self) -> None:
        for s in self.sockets or []:
            s.close()


def _timed(call: Callable[[], None], until: float) -> list[float]:
    """Call repeatedly until `until`; the duration of every call."""
    times = []
    while time.monotonic() < until:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
        time.sleep(0.02)
    return times


def _under_attack(server: Target, attack: Callable[[float], None]) -> dict[str, list[float]]:
    """Normal HTTP (kept-alive and new connections) and gRPC calls while `attack(until)` runs
    in another thread; their durations."""
    item = {"prompt_ids": [5, 6, 7], "response_ids": [30, 31, 32, 33]}
    request = pb.ScoreRequest(items=[pb.Item(**item)])
    expected = httpx.post(f"{server.url}/score", json={"items": [item]}, timeout=TIMEOUT).json()

    def over_http(client: httpx.Client) -> Callable[[], None]:
        def call() -> None:
            r = client.post("/score", json={"items": [item]})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["results"][0]["rewards"],
                                       expected["results"][0]["rewards"], atol=1e-6)
        return call

    def fresh_connection() -> None:  # a raw socket: no client set-up time in the measure
        assert _status(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                       b"\r\n", _port(server.url)) == 200

    until = time.monotonic() + ATTACK_S
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client, \
            grpc.insecure_channel(server.grpc_target) as ch, ThreadPoolExecutor(4) as pool:
        stub = pb_grpc.RewardServiceStub(ch)

        def over_grpc() -> None:
            assert len(stub.Score(request, timeout=TIMEOUT).results[0].rewards) == 4

        attacking = pool.submit(attack, until)
        time.sleep(1.0)  # the attack is under way
        futures = {name: pool.submit(_timed, call, until) for name, call in
                   [("http", over_http(client)), ("new connections", fresh_connection),
                    ("grpc", over_grpc)]}
        times = {name: f.result(timeout=ATTACK_S + 2 * TIMEOUT) for name, f in futures.items()}
        attacking.result(timeout=ATTACK_S + 2 * TIMEOUT)
    return times


def assert_not_stalled(times: dict[str, list[float]]) -> None:
    """Every kind of caller kept being answered through the attack: calls in a row, none
    held for STALL_S or more. How fast they were is printed (a figure, not asserted)."""
    for name, durations in times.items():
        p95 = float(np.percentile(durations, 95))
        print(f"\n{name}: {len(durations)} calls, p95 {p95 * 1000:.1f} ms, "
              f"max {max(durations) * 1000:.1f} ms")
        assert len(durations) >= 5, (name, durations)
        assert max(durations) < STALL_S, (name, p95, max(durations))


def test_slow_clients_do_not_stall_other_callers(server: Target) -> None:
    trickle = Trickle(server)
    trickle.open()
    try:
        times = _under_attack(server, trickle.run)
        print(f"\nslow clients: {len(trickle.sockets or [])} of "
              f"{trickle.header_clients + trickle.body_clients + trickle.grpc_clients} still "
              f"open after {ATTACK_S:.0f} s ({trickle.closed_by_server} closed by the server)")
    finally:
        trickle.close()
    assert_not_stalled(times)
    assert server.process.poll() is None
    assert httpx.get(f"{server.url}/healthz", timeout=TIMEOUT).status_code == 200


def test_oversized_headers_get_431_and_do_not_stall_others(server: Target) -> None:
    statuses: dict[str, Outcomes] = collections.defaultdict(collections.Counter)
    port = _port(server.url)

    def attack(until: float) -> None:
        while time.monotonic() < until:
            for name, raw in oversized_headers().items():
                answer = _answer(raw, port)
                statuses[name][answer.status] += 1
                assert_headers_too_large(answer)

    times = _under_attack(server, attack)
    print(f"\noversized headers (status: requests): {dict(statuses)}")
    assert set(statuses) == set(oversized_headers()), statuses
    assert_not_stalled(times)
    assert server.process.poll() is None
    assert httpx.get(f"{server.url}/healthz", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize("name", list(oversized_headers()))
def test_oversized_headers_are_refused(server: Target, name: str) -> None:
    """A request whose request line and headers are over 64 KiB is refused with 431
    `headers_too_large`, then the connection closes: not read into memory and served. The
    server still answers on a new connection."""
    port = _port(server.url)
    assert_headers_too_large(_answer(oversized_headers()[name], port))
    assert _status(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                   port) == 200


def test_a_huge_header_is_refused_as_it_arrives_and_does_not_stall_other_callers(
        server: Target) -> None:
    """httptools joins a header value's pieces with `bytes +=` on the event loop, quadratic in
    its size: before server/http_headers.py refused headers over 64 KiB as they arrive, one
    64 MiB header stalled every HTTP and gRPC caller for ~5 s. Now the server answers 431 and
    closes the connection long before the 64 MiB are sent (the client's send fails: far more
    than the sockets' buffers hold was never read)."""
    port, answers = _port(server.url), []
    raw = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (64 << 20) + \
        b"\r\n\r\n"

    def attack(until: float) -> None:
        time.sleep(1.5)  # the timed calls are under way
        answers.append(_answer(raw, port, timeout=120))

    times = _under_attack(server, attack)
    print(f"\n64 MiB header: {answers[0].status}, sent all: {answers[0].sent_all}")
    assert_headers_too_large(answers[0])
    assert not answers[0].sent_all, "the server read the whole 64 MiB header"
    assert server.process.poll() is None
    assert_not_stalled(times)
