"""Upstreams are origins: a remote source is asked at its configured origin (scheme, host, port)
and under its configured base path, nowhere else; its credentials go there only.

URLs an upstream hands us (BulkDataURIs in its metadata, Location headers) are data. A reference
is resolved against the URL of the response that carried it (PS3.18 F.2.6: a BulkDataURI is a
URI, RFC 3986; a relative one is relative to the base URI of the response, RFC 3986 5.1.3 and
5.2), its dot segments removed (RFC 3986 5.2.4), and it is kept only when it stays on the origin and
under the base path. Anything a server or a client library could read as another path than the
one checked (percent-encoded dots or slashes, backslashes, ``..;`` segments) is refused rather
than guessed at: aiohttp's URL parser, for one, decodes ``%2e%2e`` and then removes the segment.

Pure functions, no I/O: the source calls ``check`` on every URL before it sends a request, the
same URL it then sends (normalised here, so the client library has nothing left to reinterpret).
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

from gateway.errors import ConfigError, SourceError

__all__ = ["Origin", "OffOrigin", "quoted"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_AMBIGUOUS = re.compile(r"%(2e|2f|5c)|\\", re.IGNORECASE)  # ".", "/", "\" in disguise
_SHOWN = 200  # characters of an upstream URL quoted in a message, at most


class OffOrigin(SourceError):
    """An upstream-supplied URL that leaves the source's origin or base path: never fetched."""


class Origin:
    """Where one source may be asked: ``base_url`` is the configured DICOMweb base URL."""

    def __init__(self, source: str, base_url: str) -> None:
        self.source = source
        parts = urlsplit(base_url)
        self._parts = parts
        self.scheme = parts.scheme.lower()
        self.host = parts.hostname or ""
        try:
            self.port = _port(parts) or 0
        except ValueError:
            raise ConfigError(f"sources.{source}.url: the port is not a number in 0-65535") from None
        self.base = _remove_dot_segments(parts.path).rstrip("/")
        # The base URL as messages show it: without any user:password it may carry.
        self.shown = f"{self.scheme}://{_host_port(self.host, parts.port)}{self.base}"

    def url(self, path: str) -> str:
        """The URL of one of our own paths under the base URL (``/studies/...``), checked."""
        return self.check(self._parts.geturl().rstrip("/") + path, "path")

    def join(self, reference: str, base: str) -> str:
        """``reference`` (absolute or relative) resolved against ``base``, the URL of the response
        that carried it (RFC 3986 5.2); unchecked, the caller checks it before any use."""
        try:
            return urljoin(base, reference)
        except ValueError:
            return reference  # malformed: ``check`` refuses it

    def check(self, url: str, what: str) -> str:
        """``url`` normalised (dot segments removed, fragment dropped, the configured user info
        kept) when it is under the base URL; ``OffOrigin`` naming the reason otherwise."""
        reason = self._refusal(url)
        if reason is not None:
            raise OffOrigin(f"source {self.source}: {what} {quoted(url)} {reason}: not fetched")
        parts = urlsplit(url)
        # Our scheme and netloc: the same origin, and the configured user info (if any) with it.
        return urlunsplit(
            (self._parts.scheme, self._parts.netloc, _remove_dot_segments(parts.path), parts.query, "")
        )

    def _refusal(self, url: str) -> str | None:
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
            return "contains spaces or control characters"
        try:
            parts = urlsplit(url)
            port = _port(parts)
        except ValueError:
            return "is malformed"
        if parts.scheme.lower() not in _DEFAULT_PORTS:
            return "is not an http(s) URL"
        if (parts.scheme.lower(), parts.hostname or "", port) != (self.scheme, self.host, self.port):
            return f"leaves the source's origin ({self.scheme}://{_host_port(self.host, self.port)})"
        if parts.username is not None and (parts.username, parts.password) != (
            self._parts.username,
            self._parts.password,
        ):
            return "carries other credentials than the source's"
        if _AMBIGUOUS.search(parts.path):
            return "hides a dot or a separator in its path (percent-encoded, or a backslash)"
        path = _remove_dot_segments(parts.path)
        if any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/")):
            return "has a dot segment with parameters"
        if path != self.base and not path.startswith(self.base + "/"):
            return f"is outside the source's base path ({self.base or '/'})"
        return None


def _port(parts: SplitResult) -> int | None:
    port = parts.port  # ValueError for a port that is not a number in 0-65535
    return port if port is not None else _DEFAULT_PORTS.get(parts.scheme.lower())


def _host_port(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"


def quoted(value: object) -> str:
    """An upstream-supplied value fit for a message or a log line: user info dropped, escaped
    (repr: no newline or control character gets through), shortened."""
    text = str(value)
    text = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@", r"\1", text)
    if len(text) > _SHOWN:
        text = text[:_SHOWN] + "..."
    return repr(text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 (urljoin applies it to relative references only, not to absolute URLs)."""
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/".join(output)  # the leading "" of an absolute path is never popped: it stays absolute
