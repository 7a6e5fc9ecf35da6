"""multipart/related payloads (RFC 2387, PS3.18 8.6.1.2), written without I/O.

A random boundary per response (never a fixed one that image bytes could contain), part headers
that carry each part's media type and transfer syntax, and a total length known before the first
byte so that the response has a Content-Length: a client can tell a cut transfer from a complete one.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

__all__ = ["MultipartWriter"]


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
