"""API keys and exposure, against real `tokenrm serve` processes on 127.0.0.1: with keys set,
every HTTP route of the app (enumerated from the app itself) and every gRPC method the server
exposes (enumerated from the services' descriptors and the server's own reflection) refuses a
missing, wrong or wrongly presented key (401 / UNAUTHENTICATED), except /healthz, the gRPC
health check and the web page (GET / and its static files, which hold no data and no secret);
the schema and docs pages are not served; the default bind address is loopback
(the container's is every interface); and no key, right or wrong, reaches the server's output."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fastapi.routing
import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from tokenrm.proto import reward_pb2 as pb
from tokenrm.server.app import create_app
from tokenrm.server.http_page import STATIC
from tokenrm.server.launcher import Running, free_port, serve, stop
from tokenrm.server.settings import Settings

TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parents[1]
# Distinctive, so that finding one in the server's output can only mean it was written there.
KEYS = ("k-Tq7Zr2Lw9Xv4Np", "k-Hm3Ys8Bd6Jc1Fg")
WRONG = "k-Wx5Pn0Qe7Ka2Ud"
# Authorization values that must not pass (None: no header at all).
BAD: dict[str, str | None] = {
    "no header": None,
    "wrong key": f"Bearer {WRONG}",
    "Basic scheme": f"Basic {KEYS[0]}",
    "no scheme": KEYS[0],
    "scheme only": "Bearer",
    "a key's prefix": f"Bearer {KEYS[0][:-1]}",
    "the whole key list": f"Bearer {','.join(KEYS)}",
}
GOOD = [f"Bearer {key}" for key in KEYS]  # every configured key passes

SCORE_BODY = b'{"items": [{"prompt_ids": [1, 5], "response_ids": [7, 9]}]}'
# HTTP: what the issue promises exists, and what answers 200 with a key (the rest: not 401).
HTTP_EXPECTED = {("POST", "/score"), ("GET", "/v1/model"), ("GET", "/readyz"),
                 ("GET", "/metrics"), ("GET", "/healthz")}
HTTP_PUBLIC = {("GET", "/healthz")}
# The web page: the HTML at / and every file of server/static/ at /static/<file>; nothing else.
PAGE = {("GET", "/")} | {("GET", f"/static/{p.relative_to(STATIC).as_posix()}")
                         for p in STATIC.rglob("*") if p.is_file()}
PAGE_SUFFIXES = {".html", ".css", ".js", ".svg"}  # what the page is made of; no data files
DOCS = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")}  # without keys only

SERVICE = pb.DESCRIPTOR.services_by_name["RewardService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
# gRPC: load balancers' health checks need no key; every other method does.
GRPC_PUBLIC = {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
GRPC_EXPECTED = {f"/{SERVICE.full_name}/{m}" for m in ("Score", "ScoreStream", "GetModelInfo")} | \
    GRPC_PUBLIC | {f"/{REFLECTION.full_name}/ServerReflectionInfo"}
_SCORE = pb.ScoreRequest(items=[pb.Item(prompt_ids=[1, 5], response_ids=[7, 9])])
GRPC_EXAMPLES = {  # a valid request where an empty message is not one; the rest get empty ones
    f"/{SERVICE.full_name}/Score": _SCORE.SerializeToString(),
    f"/{SERVICE.full_name}/ScoreStream": _SCORE.SerializeToString(),
    f"/{REFLECTION.full_name}/ServerReflectionInfo":
        reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(),
}


@dataclass(frozen=True)
class Logged:
    """A `tokenrm serve` process started here, its whole output (stdout and stderr) in a file."""
    process: subprocess.Popen[str]
    url: str
    grpc_target: str
    output: Path
    keys: tuple[str, str]
    wrong: str


@pytest.fixture(scope="module")
def logged(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    """A server with two distinctive keys (a third, wrong one for requests), launched without
    waiting for it: it loads while `guarded` does. Its test stops it to read the output."""
    http_port, grpc_port = free_port(), free_port()
    keys = ("log-key-Vb8Rt3Nq6Zs1", "log-key-Gy4Km9Pw2Dx7")
    env = {k: v for k, v in os.environ.items() if k != "TOKENRM_HOST"}
    env["TOKENRM_API_KEYS"] = ",".join(keys)
    output = tmp_path_factory.mktemp("logged") / "server.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenrm.cli.main", "serve", "--model", str(tiny_checkpoint),
             "--port", str(http_port), "--grpc-port", str(grpc_port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        yield Logged(proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", output,
                     keys, "log-key-Ej5Lc0Hu8Fa3")
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint: Path, logged: Logged) -> Iterator[Running]:
    """A server with KEYS, started the way `tokenrm serve` starts by default: no --host and no
    TOKENRM_HOST in its environment. (`logged` only so that the two servers load at once.)"""
    with pytest.MonkeyPatch.context() as env:
        env.delenv("TOKENRM_HOST", raising=False)
        with serve(tiny_checkpoint, env={"TOKENRM_API_KEYS": ",".join(KEYS)}) as running:
            yield running


# ---------------------------------------------------------------- HTTP


def flat_routes(routes: Sequence[BaseRoute]) -> Iterator[tuple[BaseRoute, str, set[str] | None]]:
    """(route, path, methods) as the app matches them. Newer FastAPI keeps an included router as
    one entry of `app.routes`; its own iterator (the one the schema is built from) flattens them,
    prefixes applied. Older FastAPI's `app.routes` is flat already."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is None:
        for route in routes:
            yield route, getattr(route, "path", ""), getattr(route, "methods", None)
    else:
        for context in contexts(routes):
            yield context.original_route, context.path or "", context.methods


def route_probes(routes: Sequence[BaseRoute], prefix: str = "") -> set[tuple[str, str]]:
    """(method, path) for every route, mounted ones included, path parameters filled in. A kind
    of route this test cannot probe fails it, so that no new route slips through untested."""
    found: set[tuple[str, str]] = set()
    for route, path, methods in flat_routes(routes):
        if isinstance(route, Mount) and isinstance(route.app, StaticFiles):  # each file
            folder = Path(str(route.app.directory))
            found |= {("GET", f"{prefix}{path}/{p.relative_to(folder).as_posix()}")
                      for p in folder.rglob("*") if p.is_file()}
        elif isinstance(route, Mount):
            inner = route.routes
            found |= (route_probes(inner, prefix + path) if inner
                      else {("GET", f"{prefix}{path}/")})
        elif isinstance(route, Route):  # APIRoute and the docs pages' plain routes
            filled = re.sub(r"\{[^}]*\}", "x", prefix + path)
            found |= {(method, filled) for method in methods or {"GET"}}
        else:
            pytest.fail(f"{route!r} is a kind of route this test does not probe: teach it to")
    return found


def app_probes(api_keys: tuple[str, ...]) -> set[tuple[str, str]]:
    """The routes of the app `tokenrm serve` builds (the model loads only in its lifespan)."""
    return route_probes(create_app(Settings(api_keys=api_keys), grpc=True).routes)


def _send(client: httpx.Client, method: str, path: str,
          authorization: str | None) -> httpx.Response:
    body = SCORE_BODY if (method, path) == ("POST", "/score") else (
        b"{}" if method in ("POST", "PUT", "PATCH") else None)
    headers = {"content-type": "application/json"} if body is not None else {}
    if authorization is not None:
        headers["authorization"] = authorization
    return client.request(method, path, content=body, headers=headers)


def test_every_http_route_but_healthz_and_the_page_refuses_a_missing_or_wrong_key(
        guarded: Running) -> None:
    keyed, keyless = app_probes(KEYS), app_probes(())
    assert keyed >= HTTP_EXPECTED | PAGE, "the enumeration misses routes: it would prove nothing"
    assert len(PAGE) >= 3, PAGE  # the page, its script and its style at least
    docs = keyless - keyed  # what the app serves only without keys
    assert docs >= DOCS
    with httpx.Client(base_url=guarded.url, timeout=TIMEOUT) as client:
        for method, path in sorted(keyed):
            for name, authorization in BAD.items():
                r = _send(client, method, path, authorization)
                if (method, path) in HTTP_PUBLIC | PAGE:
                    assert r.status_code == 200, (path, name, r.status_code)
                    assert not any(s in r.text for s in (*KEYS, WRONG)), (path, name)
                    continue
                assert r.status_code == 401, (method, path, name, r.status_code, r.text[:200])
                assert r.headers.get("www-authenticate") == "Bearer", (path, name)
                if method != "HEAD":
                    assert r.json()["error"]["code"] == "unauthenticated", (path, name)
                    assert not any(s in r.text for s in (*KEYS, WRONG)), (path, name, r.text)
            for authorization in GOOD:
                r = _send(client, method, path, authorization)
                assert r.status_code != 401, (method, path, r.text[:200])
                if (method, path) in HTTP_EXPECTED:
                    assert r.status_code == 200, (method, path, r.status_code, r.text[:200])
        answer = _send(client, "POST", "/score", GOOD[1]).json()
        assert [len(x["rewards"]) for x in answer["results"]] == [2]
        # With keys the schema and docs pages are gone, with or without a key; never the schema.
        for method, path in sorted(docs):
            for authorization in (None, GOOD[0]):
                r = _send(client, method, path, authorization)
                assert r.status_code in (401, 404), (path, authorization, r.status_code)
                assert not re.search(r"openapi|swagger|redoc", r.text, re.I), (path, r.text[:200])


def test_the_web_page_and_its_files_are_public_and_hold_no_secret(guarded: Running) -> None:
    """GET / and /static/<file> answer without a key (the page asks the user for one); they are
    the page's own files, nothing else in or beside the folder is served, and none holds a key."""
    assert {Path(path).suffix for _, path in PAGE if path != "/"} <= PAGE_SUFFIXES, PAGE
    with httpx.Client(base_url=guarded.url, timeout=TIMEOUT) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for _, path in sorted(PAGE - {("GET", "/")}):
            r = client.get(path)
            assert r.status_code == 200, (path, r.status_code)
            # The page itself (/static/index.html), or a file it uses.
            assert r.content == page.content or f'"{path.lstrip("/")}"' in page.text, path
            assert "set-cookie" not in r.headers, path
            assert not any(s in r.text for s in (*KEYS, WRONG)), path
        assert not any(s in page.text for s in (*KEYS, WRONG))
        # No listing of the folder, and no way out of it.
        for path in ("/static/", "/static/%2e%2e/http_page.py", "/static/..%2fapp.py"):
            r = client.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert "create_app" not in r.text and "add_page" not in r.text, path


# ---------------------------------------------------------------- gRPC


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    answer: bytes | None  # the (first) response message, serialized
    trailers: dict[str, str]


def _metadata(authorization: str | None) -> tuple[tuple[str, str], ...]:
    return () if authorization is None else (("authorization", authorization),)


def exposed_services(channel: grpc.Channel) -> dict[str, ServiceDescriptor]:
    """The services the server registers (ours, health, reflection) plus whatever its reflection
    lists; a listed service this process cannot describe fails the test."""
    services = {s.full_name: s for s in (SERVICE, HEALTH, REFLECTION)}
    [listing] = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        metadata=_metadata(GOOD[0]), timeout=TIMEOUT)
    listed = {s.name for s in listing.list_services_response.service}
    assert listed >= {SERVICE.full_name, HEALTH.full_name}, listed
    for name in sorted(listed - services.keys()):
        try:
            services[name] = descriptor_pool.Default().FindServiceByName(name)
        except KeyError:
            pytest.fail(f"the server exposes {name}, which this test cannot describe: "
                        "import its _pb2 module here")
    return services


def call(channel: grpc.Channel, path: str, method: MethodDescriptor,
         authorization: str | None) -> Outcome:
    """One call of any kind, generically (serialized bytes in and out), with one request."""
    request = GRPC_EXAMPLES.get(path) or \
        message_factory.GetMessageClass(method.input_type)().SerializeToString()
    arg = iter([request]) if method.client_streaming else request
    metadata = _metadata(authorization)
    if not method.server_streaming:
        unary = (channel.stream_unary(path) if method.client_streaming
                 else channel.unary_unary(path))
        try:
            return Outcome(grpc.StatusCode.OK, unary(arg, metadata=metadata, timeout=TIMEOUT), {})
        except grpc.RpcError as exc:
            return Outcome(exc.code(), None, dict(exc.trailing_metadata() or ()))
    streaming = (channel.stream_stream(path) if method.client_streaming
                 else channel.unary_stream(path))
    responses = streaming(arg, metadata=metadata, timeout=TIMEOUT)
    try:
        return Outcome(grpc.StatusCode.OK, next(responses), {})  # Watch never ends: one is enough
    except StopIteration:
        return Outcome(responses.code(), None, dict(responses.trailing_metadata() or ()))
    except grpc.RpcError as exc:
        return Outcome(exc.code(), None, dict(exc.trailing_metadata() or ()))
    finally:
        responses.cancel()


def test_every_grpc_method_but_the_health_check_refuses_a_missing_or_wrong_key(
        guarded: Running) -> None:
    with grpc.insecure_channel(guarded.grpc_target) as channel:
        methods = {f"/{s.full_name}/{m.name}": m
                   for s in exposed_services(channel).values() for m in s.methods}
        assert methods.keys() >= GRPC_EXPECTED, "the enumeration misses methods"
        for path, method in sorted(methods.items()):
            for name, authorization in BAD.items():
                got = call(channel, path, method, authorization)
                if path in GRPC_PUBLIC:
                    assert got.code == grpc.StatusCode.OK and got.answer is not None, (path, name)
                    status = health_pb2.HealthCheckResponse.FromString(got.answer).status
                    assert status == health_pb2.HealthCheckResponse.SERVING, (path, name)
                    continue
                assert got.code == grpc.StatusCode.UNAUTHENTICATED, (path, name, got.code)
                assert got.trailers.get("tokenrm-error-code") == "unauthenticated", (path, name)
            for authorization in GOOD:
                got = call(channel, path, method, authorization)
                assert got.code != grpc.StatusCode.UNAUTHENTICATED, path
                if path in GRPC_EXPECTED:
                    assert got.code == grpc.StatusCode.OK, (path, got.code)
        scored = call(channel, f"/{SERVICE.full_name}/Score", SERVICE.methods_by_name["Score"],
                      GOOD[1]).answer
        assert scored is not None
        assert [len(r.rewards) for r in pb.ScoreResponse.FromString(scored).results] == [2]


# ---------------------------------------------------------------- where the server listens


def test_the_default_bind_address_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENRM_HOST", raising=False)
    assert Settings().host == "127.0.0.1"
    monkeypatch.setenv("TOKENRM_HOST", "0.0.0.0")  # the variable the container sets is read
    assert Settings().host == "0.0.0.0"


def test_the_container_binds_every_interface_and_bakes_in_no_key() -> None:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)  # continued lines as one instruction each
    runtime = re.split(r"^FROM\s", joined, flags=re.M)[-1]  # the stage `docker build` produces
    env = [line for line in runtime.splitlines() if re.match(r"\s*ENV\s", line)]
    assert any(re.search(r"(^|\s)TOKENRM_HOST=0\.0\.0\.0(\s|$)", line) for line in env), env
    settings = [line for line in joined.splitlines() if re.match(r"\s*(ENV|ARG)\s", line)]
    assert not any("TOKENRM_API_KEYS" in line for line in settings)


def non_loopback_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback, each shown usable: a listener bound
    there accepts a connection (so a refusal later means the server is not there)."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        found.update(socket.gethostbyname_ex(socket.gethostname())[2])
    for far in ("10.255.255.255", "192.0.2.1"):  # a UDP connect sends nothing; picks a source
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((far, 1))
            found.add(s.getsockname()[0])
    with contextlib.suppress(ImportError, OSError):  # Linux: every interface's address
        import fcntl

        for _index, name in socket.if_nameindex():
            with contextlib.suppress(OSError), \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                request = struct.pack("256s", name[:15].encode())
                found.add(socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, request)[20:24]))
    usable = []
    for address in sorted(found):
        ip = ipaddress.ip_address(address)
        if ip.is_loopback or ip.is_unspecified:
            continue
        try:
            with socket.socket() as listener:
                listener.bind((address, 0))
                listener.listen()
                socket.create_connection(listener.getsockname(), timeout=5).close()
        except OSError:
            continue
        usable.append(address)
    return usable


def test_a_server_started_without_host_is_not_reachable_off_loopback(guarded: Running) -> None:
    assert "--host" not in guarded.process.args
    ports = [int(guarded.url.rsplit(":", 1)[1]), int(guarded.grpc_target.rsplit(":", 1)[1])]
    for port in ports:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # there on loopback
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no usable non-loopback IPv4 address to try")
    for address in addresses:
        for port in ports:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=5).close()


# ---------------------------------------------------------------- keys in the output


def _wait_ready(proc: subprocess.Popen[str], url: str, key: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", headers={"authorization": f"Bearer {key}"},
                         timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail("the server was not ready within 60 s")


def _traffic(url: str, grpc_target: str, keys: Sequence[str], wrong: str) -> None:
    """Right, wrong and malformed requests over both transports, failing ones included."""
    good, bad = {"authorization": f"Bearer {keys[0]}"}, {"authorization": f"Bearer {wrong}"}
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        assert client.post("/score", content=SCORE_BODY, headers=good).status_code == 200
        assert client.get("/v1/model", headers={"authorization": f"Bearer {keys[1]}"}
                          ).status_code == 200
        assert client.post("/score", content=SCORE_BODY, headers=bad).status_code == 401
        assert client.get("/metrics", headers={"authorization": f"Basic {keys[0]}"}
                          ).status_code == 401
        assert client.post("/score", content=b"{not json", headers=good).status_code == 400
        metrics = client.get("/metrics", headers=good)
        assert metrics.status_code == 200
        assert not any(s in metrics.text for s in (*keys, wrong))
    # A request uvicorn cannot parse (it logs a warning), carrying the wrong key.
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        raw.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {wrong}\r\n"
                    "Content-Length: nope\r\n\r\n".encode())
        assert raw.recv(1024).startswith(b"HTTP/1.1 400")
    with grpc.insecure_channel(grpc_target) as channel:
        score = SERVICE.methods_by_name["Score"]
        stream = SERVICE.methods_by_name["ScoreStream"]
        path = f"/{SERVICE.full_name}"
        assert call(channel, f"{path}/Score", score, f"Bearer {keys[1]}").code == \
            grpc.StatusCode.OK
        for method in (score, stream):
            assert call(channel, f"{path}/{method.name}", method, f"Bearer {wrong}").code == \
                grpc.StatusCode.UNAUTHENTICATED
        invalid = channel.unary_unary(f"{path}/Score")
        with pytest.raises(grpc.RpcError) as refused:
            invalid(b"", metadata=_metadata(good["authorization"]), timeout=TIMEOUT)  # no items
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_no_key_reaches_the_server_output(logged: Logged) -> None:
    """The server's whole output (stdout and stderr, start to exit) after right, wrong and
    malformed requests over HTTP and gRPC holds no key, right or wrong, nor a piece of one.
    The server has no log level setting: it logs at INFO, uvicorn's access log off."""
    try:
        _wait_ready(logged.process, logged.url, logged.keys[0])
        _traffic(logged.url, logged.grpc_target, logged.keys, logged.wrong)
    finally:
        stop(logged.process)
    assert logged.process.returncode == 0
    text = logged.output.read_text(errors="replace")
    # Not vacuous: the output holds the server's own lines and one a request caused.
    assert "serving" in text and "gRPC on" in text, text[-2000:]
    assert "Invalid HTTP request" in text, text[-2000:]
    for secret in (*logged.keys, logged.wrong):
        for piece in (secret, secret[8:], secret[8:14], secret[-6:]):  # whole, unprefixed, parts
            assert piece not in text, (piece, text[-2000:])
