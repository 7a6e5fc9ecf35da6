"""The HTTP/1.1 connection: uvicorn's httptools protocol, with a bound on a request's head.

llhttp (through httptools) puts no limit on the request line and headers, and uvicorn keeps them
all: a client sending a 1 GB header field makes the gateway hold 1 GB before any of our code sees
the request. Here the bytes received in chunks that did not complete a request's head are counted,
and past ``MAX_HEAD`` the connection is answered 431 (RFC 6585 5) and closed, so one head holds at
most ``MAX_HEAD`` plus one read of the socket. Viewers send heads of a few hundred bytes; a bearer
token is a few kB.
"""

from __future__ import annotations

import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["BoundedHttpToolsProtocol", "MAX_HEAD"]

log = logging.getLogger("gateway.http")

MAX_HEAD = 64 * 1024  # bytes: request line and headers
_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    _head = 0  # bytes received in chunks that did not complete the current head
    _reading_head = True  # between requests too: the next one's head is on its way

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            if self._head > MAX_HEAD:
                self._refuse()
                return
            self._head += len(data)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True

    def _refuse(self) -> None:
        message = f"request line and headers larger than {MAX_HEAD} bytes\n".encode()
        log.info("a request head larger than %d bytes refused (431)", MAX_HEAD)
        if not self.transport.is_closing():
            self.transport.write(_REFUSAL % (len(message), message))
            self.transport.close()
