"""multipart/related payloads (RFC 2387, RFC 2046 5.1, PS3.18 8.6.1.2), read and written without I/O.

Writing: a random boundary per response (never a fixed one that image bytes could contain), part
headers that carry each part's media type and transfer syntax, and a total length known before the
first byte so that the response has a Content-Length: a client can tell a cut transfer from a
complete one.

Reading: upstream WADO-RS responses are read as they arrive: ``feed(chunk)`` returns events, so a
part's body is passed on before the part, let alone the response, has ended. Memory is bounded by
the chunk size plus a boundary's length, whatever the part sizes. Events: ``Headers(dict)`` at the
start of a part, ``Data(bytes)`` for body bytes, ``PartEnd()``, and ``End()`` after the closing
delimiter. Malformed input raises ``MultipartError``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.errors import SourceError

__all__ = [
    "MultipartWriter",
    "MultipartReader",
    "Headers",
    "Data",
    "PartEnd",
    "End",
    "MultipartError",
    "boundary_of",
]

_MAX_HEADERS = 16 * 1024


class MultipartError(SourceError):
    """The upstream body is not the multipart/related payload its Content-Type announced."""


@dataclass(frozen=True)
class Headers:
    headers: dict[str, str]


@dataclass(frozen=True)
class Data:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


@dataclass(frozen=True)
class End:
    pass


Event = Headers | Data | PartEnd | End


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a multipart Content-Type, quoted or not (dicomweb-client#52)."""
    for piece in content_type.split(";")[1:]:
        name, _, value = piece.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if value:
                return value
    raise MultipartError(f"no boundary in Content-Type {content_type!r}")


class MultipartReader:
    """Parses by moving a position through the buffered bytes: a frame passes through with one
    copy at most (the Data slice), however the upstream chunked it."""

    def __init__(self, boundary: str) -> None:
        self._first = b"--" + boundary.encode("latin-1")
        self._delimiter = b"\r\n" + self._first
        self._buffer = b""
        self._pos = 0  # where the unparsed bytes of _buffer start
        self._state = "preamble"  # preamble | headers | body | after | done

    def feed(self, chunk: bytes) -> list[Event]:
        if self._pos:
            self._buffer = self._buffer[self._pos :] + chunk  # the unparsed rest is short here
            self._pos = 0
        elif self._buffer:
            self._buffer += chunk
        else:
            self._buffer = chunk
        events: list[Event] = []
        while True:
            before = (self._state, self._pos)
            getattr(self, f"_{self._state}")(events)
            if (self._state, self._pos) == before:
                return events

    def close(self) -> None:
        """The upstream body ended: anything short of the closing delimiter is an error."""
        if self._state != "done":
            raise MultipartError("upstream multipart body ended before its closing delimiter")

    # -- states ----------------------------------------------------------------------------------

    def _preamble(self, events: list[Event]) -> None:
        start = self._buffer.find(self._first, self._pos)
        if start < 0:
            self._pos = max(self._pos, len(self._buffer) - len(self._first))  # may begin a delimiter
            return
        self._pos = start + len(self._first)
        self._state = "after"

    def _after(self, events: list[Event]) -> None:
        # After a delimiter: "--" closes the body, CRLF (after optional spaces) starts a part.
        if len(self._buffer) - self._pos < 2:
            return
        if self._buffer.startswith(b"--", self._pos):
            self._pos = len(self._buffer)
            self._state = "done"
            events.append(End())
            return
        end = self._buffer.find(b"\r\n", self._pos)
        if end < 0:
            if len(self._buffer) - self._pos > 256:
                raise MultipartError("garbage after a multipart delimiter")
            return
        self._pos = end + 2
        self._state = "headers"

    def _headers(self, events: list[Event]) -> None:
        if self._buffer.startswith(b"\r\n", self._pos):
            end, skip = self._pos, 2  # a part without headers
        else:
            end, skip = self._buffer.find(b"\r\n\r\n", self._pos), 4
            if end < 0:
                if len(self._buffer) - self._pos > _MAX_HEADERS:
                    raise MultipartError("multipart part headers are too long")
                return
        headers: dict[str, str] = {}
        if end > self._pos:
            for line in self._buffer[self._pos : end].decode("latin-1").split("\r\n"):
                name, colon, value = line.partition(":")
                if not colon:
                    raise MultipartError(f"malformed part header line {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
        self._pos = end + skip
        self._state = "body"
        events.append(Headers(headers))

    def _body(self, events: list[Event]) -> None:
        end = self._buffer.find(self._delimiter, self._pos)
        if end < 0:
            # Pass on all but what could be the start of a delimiter split across chunks.
            keep = len(self._delimiter) - 1
            if len(self._buffer) - self._pos > keep:
                events.append(Data(self._buffer[self._pos : len(self._buffer) - keep]))
                self._pos = len(self._buffer) - keep
            return
        if end > self._pos:
            events.append(Data(self._buffer[self._pos : end]))
        self._pos = end + len(self._delimiter)
        self._state = "after"
        events.append(PartEnd())

    def _done(self, events: list[Event]) -> None:
        self._pos = len(self._buffer)  # the epilogue is ignored (RFC 2046)


class MultipartWriter:
    def __init__(self, part_type: str, boundary: str | None = None) -> None:
        self.part_type = part_type
        self.boundary = boundary or secrets.token_hex(16)
        self._delimiter = f"--{self.boundary}\r\n".encode("ascii")

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def part_header(
        self, length: int | None, transfer_syntax: str | None = None, location: str | None = None
    ) -> bytes:
        media = self.part_type
        if transfer_syntax and transfer_syntax != "*":
            media += f"; transfer-syntax={transfer_syntax}"
        lines = [f"Content-Type: {media}"]
        if length is not None:  # unknown for parts streamed through from another server
            lines.append(f"Content-Length: {length}")
        if location:
            lines.append(f"Content-Location: {location}")
        return self._delimiter + ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    part_end = b"\r\n"

    def closing(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")

    def total_length(self, headers_and_lengths: Iterable[tuple[bytes, int]]) -> int:
        total = len(self.closing())
        for header, length in headers_and_lengths:
            total += len(header) + length + len(self.part_end)
        return total
