"""A bare HTTP/1.1 keep-alive connection for load generation.

The load generator shares this machine's cores with the servers it measures, so every CPU
second it spends is taken from them. httpx spent ~1.7 ms of CPU per 16-item request here;
this client writes pre-built request bytes and reads the status line, Content-Length and
body, nothing more, on uvloop.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class WireError(RuntimeError):
    """The server answered something this client does not read (e.g. a chunked body)."""


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    @classmethod
    def to(cls, url: str) -> Connection:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"{url}: expected http://host:port")
        return cls(parts.hostname, parts.port)

    def request(self, method: str, path: str, body: bytes = b"") -> bytes:
        """The bytes of one request, to build once and send many times."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send pre-built request bytes; the status and the body. Reconnects when closed."""
        status, _, body = await self.exchange(request)
        return status, body

    async def exchange(self, request: bytes) -> tuple[int, bytes, bytes]:
        """Like `send`, with the response head too (for Retry-After, Connection)."""
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status, length = _parse_head(head)
            return status, head, await reader.readexactly(length)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


def _parse_head(head: bytes) -> tuple[int, int]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return status, int(value)
    raise WireError(f"no Content-Length in the response head: {head[:200]!r}")
