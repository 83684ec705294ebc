"""The client's pure parts: backoff delays, splitting under limits, checking answers."""

from __future__ import annotations

import asyncio
import random

import grpc
import httpx
import numpy as np
import pytest

from tokenrm.client import (
    CertificateError,
    InputError,
    Item,
    ItemScore,
    Limits,
    ModelInfo,
    ResultError,
    RetryPolicy,
    ServerError,
)
from tokenrm.client.async_client import AsyncRewardClient, _checked, make_transport
from tokenrm.client.grpc_transport import _error as grpc_error
from tokenrm.client.http_transport import HttpTransport
from tokenrm.client.retry import Retryable


def _info(items: int = 4, request_bytes: int = 1_000_000) -> ModelInfo:
    return ModelInfo("rm", "token", ("negative", "neutral", "positive"), "pos_minus_neg", 640,
                     640, Limits(items, 640, request_bytes))


def _score(n: int, **changes: object) -> ItemScore:
    fields = {"rewards": np.zeros(n, np.float32), "token_ids": np.arange(n), "offsets": None,
              "tokens": None, "span_rewards": None, "total": 0.0, **changes}
    return ItemScore(**fields)  # type: ignore[arg-type]


def test_backoff_grows_is_capped_jittered_and_honours_the_hint() -> None:
    policy = RetryPolicy(initial_s=0.1, max_s=1.0, multiplier=2.0)
    rng = random.Random(0)
    delays = [[policy.delay_s(attempt, rng=rng) for _ in range(500)] for attempt in range(6)]
    assert all(0 <= d <= min(1.0, 0.1 * 2 ** a) for a, ds in enumerate(delays) for d in ds)
    assert max(delays[5]) > 0.9 and max(delays[0]) < 0.1  # grows to the cap
    assert len(set(delays[3])) > 400                       # jittered
    assert policy.delay_s(0, retry_after_s=2.5, rng=rng) == 2.5
    assert not RetryPolicy().gives_up(100) and RetryPolicy(max_attempts=2).gives_up(2)


def test_items_are_split_under_the_item_and_byte_limits() -> None:
    client = AsyncRewardClient("http://127.0.0.1:9")
    items = [Item.tokens([1], [5] * n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)]
    chunks = client._split(items, _info(items=4))
    assert [start for start, _ in chunks] == [0, 4, 8]
    assert [x for _, chunk in chunks for x in chunk] == items
    small = client._split(items, _info(items=100, request_bytes=400))  # ~ 100 bytes per item
    assert all(len(chunk) <= 2 for _, chunk in small) and len(small) >= 5
    client.items_per_request = 3
    assert [len(c) for _, c in client._split(items, _info(items=4))] == [3, 3, 3, 1]


def test_an_answer_that_does_not_fit_its_item_is_refused() -> None:
    item = Item.tokens([1], [5, 6, 7])
    assert _checked(0, item, _score(3)).rewards.shape == (3,)
    with pytest.raises(ResultError, match=r"items\[7\].*2 rewards for 3 response tokens"):
        _checked(7, item, _score(2))
    with pytest.raises(ResultError, match="non-finite"):
        _checked(0, item, _score(3, rewards=np.array([0, np.nan, 0], np.float32)))
    with pytest.raises(ResultError, match="2 tokens for 3 rewards"):
        _checked(0, item, _score(3, tokens=["a", "b"]))
    text = Item.text("p", "a b", spans=[(0, 1), (1, 3)])
    with pytest.raises(ResultError, match="0 span rewards for 2 spans"):
        _checked(0, text, _score(2))


def test_urls_pick_the_transport_and_bad_ones_are_refused() -> None:
    asyncio.set_event_loop(None)  # as after asyncio.run: clients are made outside any loop
    assert type(make_transport("http://h:1", None, None)).__name__ == "HttpTransport"
    assert type(make_transport("grpc://h:1", None, None)).__name__ == "GrpcTransport"
    for url, server in (("http://h:8000/score", "http://h:8000"),  # the endpoint, as pasted
                        ("https://h/prefix/score/", "https://h/prefix"),
                        ("http://h:8000/", "http://h:8000")):
        transport = make_transport(url, None, None)
        assert isinstance(transport, HttpTransport) and transport.url == server, url
    with pytest.raises(ValueError, match="http://, https://, grpc:// or grpcs://"):
        make_transport("ftp://h:1", None, None)


def _rpc_error(code: grpc.StatusCode, details: str = "why", **trailing: str
               ) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(),
                                grpc.aio.Metadata(*trailing.items()), details=details)


# What grpcio 1.8x says when a grpcs:// handshake fails on the certificate (seen here), and when
# the server is simply not there
UNTRUSTED = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:38845: "
             "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
             "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: self signed certificate: OK")
WRONG_HOST = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:41149: "
              "Custom verification check failed with error: UNAUTHENTICATED: Hostname "
              "Verification Check failed.")
REFUSED = ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
           "Failed to connect to remote host: Connection refused")


def test_a_certificate_failure_is_not_retried_but_an_absent_server_is() -> None:
    for details in (UNTRUSTED, WRONG_HOST):
        error = grpc_error("t", _rpc_error(grpc.StatusCode.UNAVAILABLE, details))
        assert isinstance(error, CertificateError) and str(error).startswith("t: UNAVAILABLE")
    refused = grpc_error("t", _rpc_error(grpc.StatusCode.UNAVAILABLE, REFUSED))
    assert isinstance(refused, Retryable) and refused.endpoint_down


def test_grpc_statuses_map_to_retries_server_errors_and_input_errors() -> None:
    cancelled = grpc_error("t", _rpc_error(grpc.StatusCode.CANCELLED))  # the server stopped
    assert isinstance(cancelled, Retryable) and cancelled.endpoint_down
    busy = grpc_error("t", _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      **{"retry-after-ms": "250"}))
    assert isinstance(busy, Retryable) and not busy.endpoint_down and busy.retry_after_s == 0.25
    for code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED):
        assert isinstance(grpc_error("t", _rpc_error(code)), ServerError), code
    ours = grpc_error("t", _rpc_error(grpc.StatusCode.INTERNAL, **{
        "tokenrm-error-code": "internal"}))
    assert isinstance(ours, ServerError)  # tokenrm's own failure: another try would fail too
    proxy = grpc_error("t", _rpc_error(grpc.StatusCode.INTERNAL))  # a Ray replica that died
    assert isinstance(proxy, Retryable) and not proxy.endpoint_down
    bad = grpc_error("t", _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, **{
        "tokenrm-item": "3", "tokenrm-field": "response_ids"}))
    assert isinstance(bad, InputError) and (bad.item, bad.field) == (3, "response_ids")
    too_big = grpc_error("t", _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, **{
        "tokenrm-error-code": "payload_too_large"}))
    assert isinstance(too_big, InputError)  # another try cannot fix it


async def _answering(response: httpx.Response) -> HttpTransport:
    """An HttpTransport to http://h:1 whose every request gets `response`."""
    transport = HttpTransport("http://h:1", None)
    await transport._http.aclose()
    transport._http = httpx.AsyncClient(base_url="http://h:1", transport=httpx.MockTransport(
        lambda request: response))
    return transport


@pytest.mark.parametrize("body", [b"<html>not json</html>", b'{"results": 3}', b"[]"])
def test_a_200_answer_that_is_not_tokenrms_json_is_a_result_error(body: bytes) -> None:
    async def main() -> None:
        transport = await _answering(httpx.Response(200, content=body))
        try:
            with pytest.raises(ResultError, match=r"http://h:1/score: not a tokenrm answer"):
                await transport.score([Item.tokens([1], [2])], False, 5.0)
            with pytest.raises(ResultError, match=r"http://h:1/v1/model: not a tokenrm answer"):
                await transport.model_info(5.0)
        finally:
            await transport.close()

    asyncio.run(main())


def test_an_http_input_error_says_the_servers_error_code() -> None:
    async def main() -> InputError:
        answer = {"error": {"code": "invalid_input", "message": "items[0].response: empty",
                            "item": 0, "field": "response"}}
        transport = await _answering(httpx.Response(422, json=answer))
        try:
            with pytest.raises(InputError) as refused:
                await transport.score([Item.text("p", "")], False, 5.0)
        finally:
            await transport.close()
        return refused.value

    error = asyncio.run(main())
    assert error.message == "http://h:1/score: 422 invalid_input: items[0].response: empty"
    assert (error.item, error.field) == (0, "response")


def test_a_500_that_is_not_tokenrms_answer_is_retried_and_tokenrms_own_is_not() -> None:
    """Ray Serve's proxy answers a plain-text 500 when the replica it chose dies: another try
    reaches a live one. A 500 with tokenrm's error body would fail again."""
    async def main(response: httpx.Response) -> Exception:
        transport = await _answering(response)
        try:
            await transport.score([Item.tokens([1], [2])], False, 5.0)
        except Exception as exc:
            return exc
        finally:
            await transport.close()
        raise AssertionError("a 500 was taken for an answer")

    proxy = asyncio.run(main(httpx.Response(500, text="Internal Server Error")))
    assert isinstance(proxy, Retryable) and not proxy.endpoint_down
    ours = asyncio.run(main(httpx.Response(500, json={"error": {"code": "internal",
                                                                 "message": "boom"}})))
    assert isinstance(ours, ServerError) and "internal: boom" in str(ours)
