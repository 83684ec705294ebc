"""uvicorn's httptools protocol with a limit on the size of a request's header section.

httptools gathers a header value by appending each piece to a bytes object, on the event loop
that every caller shares: one client sending a header of tens of megabytes stalls all others
for seconds, and uvicorn sets no limit. This protocol counts the header bytes as they arrive
and answers 431 (then closes the connection) once they pass the limit, before the parser
gathers them.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokenrm.server.errors import HeadersTooLarge
from tokenrm.server.http_errors import error_body

MAX_HEADER_BYTES = 64 * 1024  # request line and headers; browsers send a few KB at most


class BoundedHeadersProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True     # between a request's first byte and its headers' end
        self._header_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused: what else arrives goes with the connection
        if self._in_headers:
            end = data.find(b"\r\n\r\n")
            self._header_bytes += len(data) if end < 0 else end
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse()
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_headers, self._header_bytes = True, 0  # the next request on this connection

    def _refuse(self) -> None:
        body = error_body(HeadersTooLarge(
            f"headers: more than {MAX_HEADER_BYTES} bytes; the limit is {MAX_HEADER_BYTES} "
            "bytes for the request line and headers", field="headers"))
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n"
                             b"connection: close\r\n\r\n" + body)
        self.transport.close()
