"""A real HTTP/1.1 proxy on 127.0.0.1 for client tests: it forwards to a tokenrm HTTP server and,
when told to, refuses POST /score (429 or 503 with `Retry-After`) or tampers with its answers.

    with FaultyProxy(server.url) as proxy:
        proxy.refuse(2)                      # the next 2 POST /score get 429, Retry-After: 1
        RewardClient(proxy.url).score(...)
        proxy.score_requests                 # POST /score requests seen, refused ones included

It runs an asyncio server on its own thread and loop, and stops by itself after `lifetime_s`
(so a test that forgets it cannot hang the run) or when its context exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from types import TracebackType
from typing import Any

import httpx

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "content-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 413: "Payload Too Large",
            422: "Unprocessable Entity", 429: "Too Many Requests", 502: "Bad Gateway",
            503: "Service Unavailable"}


class FaultyProxy:
    def __init__(self, upstream: str, *, lifetime_s: float = 120.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.lifetime_s = lifetime_s
        self.url = ""                    # http://127.0.0.1:<port>, once started
        self._lock = threading.Lock()
        self._score_requests = 0
        self._in_flight = 0
        self._max_in_flight = 0          # most POST /score forwarded at once
        self._refusals_left = 0          # -1: refuse every POST /score
        self._refuse_status = 429
        self._retry_after: str | None = "1"
        self._tamper: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------ what the test controls

    def refuse(self, n: int | None, status: int = 429, retry_after: str | None = "1") -> None:
        """Refuse the next `n` POST /score requests (None: all of them) with `status`."""
        with self._lock:
            self._refusals_left = -1 if n is None else n
            self._refuse_status, self._retry_after = status, retry_after

    def tamper(self, how: str | None) -> None:
        """'drop': remove the last reward of every result of successful POST /score answers;
        'nan': replace the first reward of every result by NaN; None: stop tampering."""
        with self._lock:
            self._tamper = how

    def reset(self) -> None:
        with self._lock:
            self._score_requests, self._refusals_left, self._tamper = 0, 0, None
            self._max_in_flight = 0

    @property
    def score_requests(self) -> int:
        with self._lock:
            return self._score_requests

    @property
    def max_concurrent_score(self) -> int:
        """The most POST /score requests forwarded upstream at once (since the last reset)."""
        with self._lock:
            return self._max_in_flight

    # ------------------------------------------------------------ life cycle

    def __enter__(self) -> FaultyProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="faulty-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"the proxy did not start: {failure}")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended (lifetime over)
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10)

    async def _serve(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=self.upstream, timeout=60.0) as upstream:
            server = await asyncio.start_server(
                lambda r, w: self._connection(r, w, upstream), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.lifetime_s)
            server.close()
            for writer in list(self._writers):
                writer.close()
            await asyncio.wait_for(server.wait_closed(), 5)

    # ------------------------------------------------------------ HTTP

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          upstream: httpx.AsyncClient) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [(k.strip(), v.strip()) for k, v in
                           (line.split(":", 1) for line in lines[1:] if line)]
                lower = {k.lower(): v for k, v in headers}
                if lower.get("transfer-encoding", "").lower() == "chunked":
                    body = await _read_chunked(reader)
                else:
                    body = await reader.readexactly(int(lower.get("content-length", "0")))
                status, out_headers, out_body = await self._answer(
                    upstream, method, target, headers, body)
                closing = lower.get("connection", "").lower() == "close"
                out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                       *(f"{k}: {v}" for k, v in out_headers),
                       f"content-length: {len(out_body)}",
                       f"connection: {'close' if closing else 'keep-alive'}", "", ""]
                writer.write("\r\n".join(out).encode("latin-1") + out_body)
                await writer.drain()
                if closing:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, upstream: httpx.AsyncClient, method: str, target: str,
                      headers: list[tuple[str, str]], body: bytes
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
        is_score = method == "POST" and target.split("?", 1)[0] == "/score"
        tamper = None
        if is_score:
            with self._lock:
                self._score_requests += 1
                refusing = self._refusals_left != 0
                if self._refusals_left > 0:
                    self._refusals_left -= 1
                status, retry_after, tamper = \
                    self._refuse_status, self._retry_after, self._tamper
            if refusing:
                code = "overloaded" if status == 429 else "unavailable"
                error = {"error": {"code": code, "message": f"refused by the test proxy ({status})",
                                   "item": None, "field": None}}
                out = [("content-type", "application/json")]
                if retry_after is not None:
                    out.append(("retry-after", retry_after))
                return status, out, json.dumps(error).encode()
        if is_score:
            with self._lock:
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            r = await upstream.request(method, target, content=body, headers=[
                (k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP])
        except httpx.TransportError as exc:
            return 502, [("content-type", "text/plain")], f"upstream: {exc!r}".encode()
        finally:
            if is_score:
                with self._lock:
                    self._in_flight -= 1
        out_body = r.content
        if tamper is not None and r.status_code == 200:
            out_body = _tampered(r.json(), tamper)
        return r.status_code, [(k, v) for k, v in r.headers.items()
                               if k.lower() not in _HOP_BY_HOP], out_body


def _tampered(answer: dict[str, Any], how: str) -> bytes:
    for result in answer["results"]:
        if how == "drop":
            result["rewards"] = result["rewards"][:-1]
        elif how == "nan":
            result["rewards"][0] = float("nan")
        else:
            raise ValueError(how)
    return json.dumps(answer).encode()  # NaN is written as the (non-standard) literal NaN


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers expected: the empty line
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
