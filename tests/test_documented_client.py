"""Documented client behaviour that had no test (issue 19, item 5): TLS (`grpcs://`, `https://`,
`root_certificates=`; a certificate that fails verification is a CertificateError at once), a
500 in tokenrm's error format (ServerError, not retried) and a 503 `deadline_exceeded` (retried
within the call's deadline), over HTTP and gRPC, and an answer that cannot be right over gRPC
(ResultError). The TLS server is a real `tokenrm serve` on 127.0.0.1; refusals and wrong
answers come from small in-test servers that speak tokenrm's formats (the server's own error
encoders) or forward to the real one."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tokenrm.client import (
    AsyncRewardClient,
    CertificateError,
    DeadlineError,
    Item,
    ItemScore,
    ResultError,
    RetryPolicy,
    RewardClient,
    ServerError,
)
from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.errors import DeadlineExceeded, ScoringError
from tokenrm.server.grpc_messages import STATUS as GRPC_STATUS
from tokenrm.server.grpc_messages import trailing_metadata
from tokenrm.server.http_errors import STATUS as HTTP_STATUS
from tokenrm.server.http_errors import error_body, error_headers
from tokenrm.server.launcher import Running, serve

TIMEOUT = 30.0          # one request; only catches a hang
START_TIMEOUT = 180.0   # a server process to become ready (the machine may be shared)
FAST = RetryPolicy(initial_s=0.01, max_s=0.1)
ITEMS = [Item.text("Facts: Ana lives in Lima. Question: Where does Ana live?",
                   "Ana lives in Oslo."),
         Item.tokens([1, 57, 80], [311, 279, 12]),
         Item.text("Where?", "Köln. Łódź.")]


# ---------------------------------------------------------------- a certificate and TLS


def _self_signed(directory: Path, host: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for `host` (localhost: and 127.0.0.1), valid for a day:
    (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    if host == "localhost":
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TlsTerminator:
    """https://127.0.0.1:<port>, each connection piped as plain TCP to an HTTP server (as a load
    balancer that terminates TLS would): tokenrm serves HTTP only, its gRPC has TLS built in."""

    def __init__(self, upstream: str, cert: Path, key: Path) -> None:
        self.upstream_port = int(upstream.rsplit(":", 1)[1])
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="tls-terminator")
        self._ready = threading.Event()

    def __enter__(self) -> TlsTerminator:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "the TLS terminator did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)

    def _run(self) -> None:
        # A client that does not trust the certificate aborts the handshake: not an error here.
        self._loop.set_exception_handler(lambda loop, context: None)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0, ssl=self.context)
        self.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        await self._stop.wait()
        server.close()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, cert: tuple[Path, Path]) -> Iterator[Running]:
    """`tokenrm serve`: HTTP in the clear, gRPC over TLS (TOKENRM_GRPC_TLS_CERT / _KEY)."""
    env = {"TOKENRM_GRPC_TLS_CERT": str(cert[0]), "TOKENRM_GRPC_TLS_KEY": str(cert[1])}
    with serve(tiny_checkpoint, env=env, timeout_s=START_TIMEOUT) as running:
        yield running


@pytest.fixture(scope="module")
def plain_http(server: Running) -> list[ItemScore]:
    """The reference: the same items through the client over plain HTTP."""
    with RewardClient(server.url, timeout_s=TIMEOUT) as client:
        return client.score(ITEMS, return_tokens=True)


def assert_same(got: Sequence[ItemScore], want: Sequence[ItemScore]) -> None:
    """Sequential single requests on an idle server: the same forward passes, the same bits."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g.rewards, w.rewards) and np.array_equal(g.token_ids, w.token_ids)
        assert g.tokens == w.tokens and g.total == w.total


# ---------------------------------------------------------------- 2. TLS


def test_grpcs_with_root_certificates_speaks_tls_sync_and_async(
        server: Running, cert: tuple[Path, Path], plain_http: list[ItemScore]) -> None:
    url, roots = f"grpcs://{server.grpc_target}", cert[0].read_bytes()
    with RewardClient(url, root_certificates=roots, timeout_s=TIMEOUT) as client:
        assert_same(client.score(ITEMS, return_tokens=True), plain_http)
        assert client.model_info().name == "rm"

    async def main() -> list[ItemScore]:
        async with AsyncRewardClient(url, root_certificates=roots, timeout_s=TIMEOUT) as client:
            return await client.score(ITEMS, return_tokens=True)

    assert_same(asyncio.run(main()), plain_http)


def test_grpcs_with_an_untrusted_certificate_is_a_certificate_error_at_once(
        server: Running) -> None:
    """Without the server's certificate among the roots no call succeeds (the certificate is
    what lets the first test through), and the call is not retried until its deadline: with
    retries unbounded, a retried failure would end in DeadlineError after TIMEOUT."""
    with RewardClient(f"grpcs://{server.grpc_target}", timeout_s=TIMEOUT) as client:
        for _ in range(2):  # the next call too: its endpoint is out of the rotation by then
            with pytest.raises(CertificateError, match="CERTIFICATE_VERIFY_FAILED"):
                client.score(ITEMS)


def test_the_command_line_trusts_a_ca_given_in_the_environment(
        server: Running, cert: tuple[Path, Path]) -> None:
    """`tokenrm score` cannot pass root_certificates=: gRPC's GRPC_DEFAULT_SSL_ROOTS_FILE_PATH
    does it, as the README says; without it the command says what failed, in one line."""
    command = [sys.executable, "-m", "tokenrm.cli.main", "score", "--url",
               f"grpcs://{server.grpc_target}", "--prompt", "Where?", "--response",
               "Lima.", "--json", "--timeout", str(TIMEOUT)]
    env = {k: v for k, v in os.environ.items() if k != "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"}
    trusted = subprocess.run(command, capture_output=True, text=True, timeout=2 * TIMEOUT,
                             env={**env, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert[0])})
    assert trusted.returncode == 0, trusted.stderr
    assert len(json.loads(trusted.stdout)["results"][0]["rewards"]) > 0
    untrusted = subprocess.run(command, capture_output=True, text=True, timeout=2 * TIMEOUT,
                               env=env)
    assert untrusted.returncode != 0
    assert "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH" in untrusted.stderr
    assert "Traceback" not in untrusted.stderr, untrusted.stderr


def test_plaintext_to_the_tls_port_is_refused(server: Running) -> None:
    with RewardClient(f"grpc://{server.grpc_target}", timeout_s=TIMEOUT, retry=RetryPolicy(
            initial_s=0.01, max_attempts=2)) as client, \
            pytest.raises(ServerError, match="UNAVAILABLE"):
        client.score(ITEMS)


def test_https_speaks_tls(server: Running, cert: tuple[Path, Path],
                          plain_http: list[ItemScore], monkeypatch: pytest.MonkeyPatch) -> None:
    """https:// through a TLS terminator in front of the server; the certificate is trusted
    the way httpx reads the environment (SSL_CERT_FILE); the next test gives it as
    `root_certificates=` instead."""
    with TlsTerminator(server.url, *cert) as tls:
        with RewardClient(tls.url, timeout_s=TIMEOUT) as client, \
                pytest.raises(CertificateError, match="CERTIFICATE_VERIFY_FAILED"):
            client.score(ITEMS)  # not trusted yet: refused at once, TLS is really checked
        monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
        with RewardClient(tls.url, timeout_s=TIMEOUT) as client:
            assert_same(client.score(ITEMS, return_tokens=True), plain_http)


def test_an_endpoint_whose_certificate_fails_leaves_the_rotation(
        server: Running, cert: tuple[Path, Path], plain_http: list[ItemScore]) -> None:
    """Among several endpoints, one whose certificate is not trusted (tried first: the pool
    breaks ties by order) leaves the rotation and the others answer, sync and async."""
    with TlsTerminator(server.url, *cert) as tls:
        with RewardClient([tls.url, server.url], timeout_s=TIMEOUT) as client:
            assert_same(client.score(ITEMS, return_tokens=True), plain_http)
            assert_same(client.score(ITEMS, return_tokens=True), plain_http)

        async def main() -> list[ItemScore]:
            async with AsyncRewardClient([f"grpcs://{server.grpc_target}", server.url],
                                         timeout_s=TIMEOUT) as client:
                return await client.score(ITEMS, return_tokens=True)

        assert_same(asyncio.run(main()), plain_http)


def test_https_with_a_certificate_for_another_host_is_a_certificate_error(
        server: Running, tmp_path: Path) -> None:
    other = _self_signed(tmp_path, "other.example")
    with TlsTerminator(server.url, *other) as tls, \
            RewardClient(tls.url, root_certificates=other[0].read_bytes(), timeout_s=TIMEOUT
                         ) as client, pytest.raises(CertificateError, match="mismatch"):
        client.score(ITEMS)


def test_https_with_root_certificates(server: Running, cert: tuple[Path, Path],
                                      plain_http: list[ItemScore]) -> None:
    with TlsTerminator(server.url, *cert) as tls, \
            RewardClient(tls.url, root_certificates=cert[0].read_bytes(), timeout_s=TIMEOUT,
                         retry=RetryPolicy(max_attempts=2)) as client:
        assert_same(client.score(ITEMS, return_tokens=True), plain_http)


# ---------------------------------------------------------------- 3. 500 and 503 over HTTP

MODEL_INFO = {"name": "scripted", "version": "v1", "kind": "token",
              "labels": ["negative", "neutral", "positive"], "reward_rule": "pos_minus_neg",
              "tokenizer": "T", "tokenizer_sha256": "", "vocab_size": 400, "max_len": 192,
              "dtype": "float32", "device": "cpu",
              "limits": {"max_items_per_request": 256, "max_tokens_per_item": 192,
                         "max_body_bytes": 8 << 20, "max_batch_tokens": 16384}}
SCORED = {"model": "scripted", "model_version": "v1", "usage": {"items": 1, "tokens": 5},
          "results": [{"rewards": [0.5, -0.25, 0.125], "total": 0.375, "token_ids": [3, 4, 5],
                       "tokens": None, "offsets": None, "span_rewards": None}]}
Answer = tuple[int, bytes, dict[str, str]]
OK: Answer = (200, json.dumps(SCORED).encode(), {})


def refusal(exc: ScoringError) -> Answer:
    """What tokenrm's HTTP front door answers for `exc` (status, JSON error body, headers)."""
    return HTTP_STATUS.get(exc.code, 500), error_body(exc), error_headers(exc)


class Scripted(ThreadingHTTPServer):
    """A stand-in for a tokenrm HTTP server: GET /v1/model and /readyz answer as a ready server
    does; each POST /score gets the next of `answers` (the last one again once they run out)."""

    daemon_threads = True

    def __init__(self, answers: Sequence[Answer]) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.answers, self.score_posts = list(answers), 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> Scripted:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    def next_answer(self) -> Answer:
        with self._lock:
            self.score_posts += 1
            return self.answers[min(self.score_posts, len(self.answers)) - 1]


class _ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Scripted

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/v1/model":
            self._send((200, json.dumps(MODEL_INFO).encode(), {}))
        else:  # /readyz, the client's health check
            self._send((200, b'{"status": "ready", "queued": 0}', {}))

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self._send(self.server.next_answer())

    def _send(self, answer: Answer) -> None:
        status, body, headers = answer
        self.send_response(status)
        for name, value in {"content-type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


SCRIPTED_ITEMS = [Item.tokens([1, 2], [3, 4, 5])]


def test_http_500_in_tokenrms_format_is_a_server_error_and_is_not_retried() -> None:
    with Scripted([refusal(ScoringError("the forward pass failed")), OK]) as fake, \
            RewardClient(fake.url, timeout_s=TIMEOUT, retry=FAST) as client:
        with pytest.raises(ServerError, match="500 internal: the forward pass failed"):
            client.score(SCRIPTED_ITEMS)
        assert fake.score_posts == 1


def test_http_503_deadline_exceeded_is_retried_within_the_calls_deadline() -> None:
    expired = refusal(DeadlineExceeded("not scored within 0.5 s"))
    assert expired[0] == 503
    with Scripted([expired, expired, OK]) as fake, \
            RewardClient(fake.url, timeout_s=TIMEOUT, retry=FAST) as client:
        [got] = client.score(SCRIPTED_ITEMS)
        assert fake.score_posts == 3
    assert got.rewards.tolist() == [0.5, -0.25, 0.125] and got.total == 0.375


def test_http_503_deadline_exceeded_every_time_ends_in_a_server_error_or_at_the_deadline(
        ) -> None:
    """Retries stop when the policy's attempts are used up (ServerError naming the last
    refusal) or at the call's deadline (DeadlineError), whichever the caller set."""
    expired = refusal(DeadlineExceeded("not scored within 0.5 s"))
    with Scripted([expired]) as fake:
        with RewardClient(fake.url, timeout_s=TIMEOUT, retry=RetryPolicy(
                initial_s=0.01, max_s=0.1, max_attempts=3)) as client, \
                pytest.raises(ServerError, match=r"gave up after 3 attempts.*deadline_exceeded"):
            client.score(SCRIPTED_ITEMS)
        # A 503 takes the endpoint out of the rotation until its health check passes; an
        # attempt that finds no endpoint in it counts as one, so 1 to 3 requests were sent.
        assert 1 <= fake.score_posts <= 3
        with RewardClient(fake.url, timeout_s=3.0, retry=FAST) as client, \
                pytest.raises(DeadlineError):
            client.score(SCRIPTED_ITEMS)  # no attempt limit: retried until the call's deadline


# ---------------------------------------------------------------- 3 and 8 over gRPC


class Tampering(pb_grpc.RewardServiceServicer):
    """A gRPC RewardService that forwards to the real server, then first refuses with
    `refusals` (as tokenrm's front door does: status and trailing metadata) and spoils its
    answers as `how` says."""

    def __init__(self, upstream: pb_grpc.RewardServiceStub) -> None:
        self.upstream = upstream
        self.refusals: list[ScoringError] = []
        self.how: str | None = None
        self.calls = 0
        self._lock = threading.Lock()

    def GetModelInfo(self, request: pb.GetModelInfoRequest,  # noqa: N802 (proto names)
                     context: grpc.ServicerContext) -> pb.ModelInfo:
        return self.upstream.GetModelInfo(request, timeout=TIMEOUT)

    def Score(self, request: pb.ScoreRequest,  # noqa: N802
              context: grpc.ServicerContext) -> pb.ScoreResponse:
        with self._lock:
            self.calls += 1
            exc = self.refusals.pop(0) if self.refusals else None
        if exc is not None:
            context.set_trailing_metadata(trailing_metadata(exc))
            context.abort(GRPC_STATUS.get(exc.code, grpc.StatusCode.INTERNAL), exc.message)
        answer = self.upstream.Score(request, timeout=TIMEOUT)
        if self.how == "error":  # a failed request as ScoreStream answers it: no results
            return pb.ScoreResponse(model=answer.model, model_version=answer.model_version,
                                    error=pb.Error(code="invalid_input", item=0, field="response",
                                                   message="items[0].response: refused"))
        for result in answer.results:
            if self.how == "drop":
                del result.rewards[-1]
            elif self.how == "nan":
                result.rewards[0] = float("nan")
        if self.how == "extra":
            answer.results.append(answer.results[-1])
        return answer


@pytest.fixture(scope="module")
def tampering(server: Running, cert: tuple[Path, Path]) -> Iterator[tuple[str, Tampering]]:
    """(grpc://127.0.0.1:<port>, its servicer), in front of the module's TLS server."""
    credentials = grpc.ssl_channel_credentials(cert[0].read_bytes())
    with grpc.secure_channel(server.grpc_target, credentials) as channel:
        servicer = Tampering(pb_grpc.RewardServiceStub(channel))
        front = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_RewardServiceServicer_to_server(servicer, front)
        port = front.add_insecure_port("127.0.0.1:0")
        front.start()
        try:
            yield f"grpc://127.0.0.1:{port}", servicer
        finally:
            front.stop(None).wait(TIMEOUT)


@pytest.fixture
def fake(tampering: tuple[str, Tampering]) -> Iterator[tuple[str, Tampering]]:
    url, servicer = tampering
    yield url, servicer
    servicer.refusals, servicer.how, servicer.calls = [], None, 0


def test_grpc_internal_in_tokenrms_format_is_a_server_error_and_is_not_retried(
        fake: tuple[str, Tampering]) -> None:
    url, servicer = fake
    servicer.refusals = [ScoringError("the forward pass failed")]
    with RewardClient(url, timeout_s=TIMEOUT, retry=FAST) as client, \
            pytest.raises(ServerError, match="INTERNAL: the forward pass failed"):
        client.score(ITEMS)
    assert servicer.calls == 1


def test_grpc_deadline_exceeded_is_retried_within_the_calls_deadline(
        fake: tuple[str, Tampering], plain_http: list[ItemScore]) -> None:
    url, servicer = fake
    servicer.refusals = [DeadlineExceeded("deadline passed while queued")] * 2
    with RewardClient(url, timeout_s=TIMEOUT, retry=FAST) as client:
        got = client.score(ITEMS, return_tokens=True)
    assert servicer.calls == 3
    assert_same(got, plain_http)


@pytest.mark.parametrize("how", ["drop", "nan", "extra", "error"])
def test_a_grpc_answer_that_cannot_be_right_is_a_result_error_and_is_not_retried(
        fake: tuple[str, Tampering], how: str) -> None:
    """A reward too few, a NaN, a result too many, or a request answered with `error` set and
    no results (as ScoreStream answers a failed request): ResultError, nothing returned."""
    url, servicer = fake
    servicer.how = how
    with RewardClient(url, timeout_s=TIMEOUT, retry=FAST) as client, \
            pytest.raises(ResultError) as wrong:
        client.score(ITEMS)
    assert servicer.calls == 1
    expected = {"drop": r"items\[0\]: the server's answer is wrong: \d+ rewards for \d+ token ids",
                "nan": "non-finite", "extra": "4 results for 3 items",
                "error": "0 results for 3 items"}[how]
    assert wrong.match(expected)
