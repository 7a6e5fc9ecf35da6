"""An upstream DICOMweb service as a source: a PACS's DICOMweb endpoint, or another gateway.

Harvest walks QIDO-RS (studies, then their series) and reads each series' WADO-RS ``/metadata``
once; the instances' DICOM JSON is stored with BulkDataURIs pointing at this gateway, the upstream
URIs kept beside the location. Retrieval streams WADO-RS straight through: the upstream multipart
body is parsed as it arrives and each part's bytes are passed on, never buffered whole.

Upstreams are origins (``gateway/stream/origin.py``): every request goes to the configured base
URL, URLs the upstream hands us are checked before use, and no redirect is followed, so the
source's headers (its credentials) go to its origin only.

Deadlines (PS3.18 does not set them; users of peers ask for them, dicomweb-client#87): connecting,
each message (a chunk), and each whole exchange, which a trickle of slow chunks cannot extend and
which covers waiting for the response headers. Harvest's JSON answers are also bounded in size.
"""

from __future__ import annotations

import logging
import math
import re
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import httpcore
import httpx
import orjson
from pydicom.uid import UID

from gateway.codec.multipart import Data, Headers, MultipartReader, PartEnd, boundary_of
from gateway.config import SourceConfig
from gateway.errors import GatewayError, NotFound, SourceError, SourceTimeout, SourceUnavailable
from gateway.stream.origin import OffOrigin, Origin, quoted
from gateway.stream.source import BatchRetrieval, Frame, Watcher
from gateway.types import Entry, InstanceFile, Location, PixelInfo

__all__ = ["DicomwebSource"]

log = logging.getLogger("gateway.dicomweb")

_PAGE = 500  # studies per QIDO page
_ANY_INSTANCE = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_ANY_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
_DRAIN = 64 * 1024  # bytes read after the first part to keep the connection; past it, it is closed
# What a UID taken from an upstream answer may look like before it goes into a URL path. PS3.5 9.1
# allows digits and dots within 64 characters; archives hold worse, and what matters here is
# only that a UID cannot change the structure of the path (no "/", "..", "?", "%").
_UID = re.compile(r"[0-9A-Za-z_-]+(?:\.[0-9A-Za-z_-]+)*")
_UID_LENGTH = 128


class DicomwebSource:
    kind = "dicomweb"
    batch: BatchRetrieval | None = None  # one WADO-RS request per instance
    learns_on_retrieve = False  # a series' /metadata gives each instance's whole header
    watch: Watcher | None = None  # asked again every interval (incrementally)

    def __init__(self, config: SourceConfig) -> None:
        assert config.url is not None
        self.name = config.name
        self.url = config.url
        self.origin = Origin(config.name, config.url)
        self.headers = dict(config.headers)
        self.deadlines = config.deadlines
        self.max_answer = config.max_answer_bytes
        self._client: aiohttp.ClientSession | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.deadlines.message, connect=self.deadlines.connect)

    # -- harvest (blocking, in a worker thread) ------------------------------------------------------

    def scan(self, since: str | None = None) -> Iterator[Entry]:
        window = {"StudyDate": f"{since}-"} if since else {}
        clock = _Clock()
        # No base_url: every request names the full URL that the origin policy checked. httpx
        # follows no redirect unless asked (follow_redirects=False, its default, kept so): a 3xx
        # is answered as an error, and the source's headers never leave its origin.
        with httpx.Client(
            headers=self.headers, timeout=self._timeout(), transport=_transport(clock), follow_redirects=False
        ) as http:
            seen: set[str] = set()
            offset = 0
            while True:
                page = {"limit": str(_PAGE), "offset": str(offset), **window}
                studies = self._json(http, clock, "/studies", page)
                if len(studies) > _PAGE:
                    log.warning(
                        "source %s: /studies answered %d studies for a page of %d (it ignores limit)",
                        self.name,
                        len(studies),
                        _PAGE,
                    )
                new = 0
                for study in studies:
                    key = repr(_value(study, "0020000D", default=None))
                    if key in seen:
                        continue
                    seen.add(key)
                    new += 1
                    study_uid = self._uid(study, "0020000D", "/studies")
                    if study_uid is None:
                        continue
                    yield from self._study(http, clock, study_uid)
                if len(studies) < _PAGE:
                    return
                if not new:
                    # Only studies already listed: an upstream that ignores offset. Stop, or the
                    # harvest loops forever. If it ignores limit too, it sent all it has: the
                    # listing is complete. Otherwise the listing is cut short, and a failed
                    # harvest removes nothing (harvest.py) rather than what was not listed.
                    if len(studies) > _PAGE:
                        log.warning(
                            "source %s: /studies ignores limit and offset (the same %d studies at "
                            "offset %d); the listing ends there",
                            self.name,
                            len(studies),
                            offset,
                        )
                        return
                    raise SourceError(
                        f"source {self.name}: /studies at offset {offset} answered only studies already "
                        "listed (it ignores offset); the listing is incomplete"
                    )
                offset += len(studies)  # PS3.18 8.3.4: offset is the number of results skipped

    def _study(self, http: httpx.Client, clock: _Clock, study_uid: str) -> Iterator[Entry]:
        where = f"/studies/{study_uid}/series"
        for series in self._json(http, clock, where, {}):
            series_uid = self._uid(series, "0020000E", where)
            if series_uid is None:
                continue
            path = f"/studies/{study_uid}/series/{series_uid}/metadata"
            for item in self._json(http, clock, path, {}):
                entry = self._entry(item, path)
                if entry is not None:
                    yield entry

    def read_header(self, entry: Entry) -> Any:
        raise SourceError(f"source {self.name}: entries come with their metadata")  # never called

    def _json(self, http: httpx.Client, clock: _Clock, path: str, params: dict[str, str]) -> list[Any]:
        """The JSON array an upstream answers at ``path``, read in chunks under the total deadline
        (headers included, see ``_Clock``) and at most ``max_answer_bytes`` long."""
        url = self.origin.url(path)
        clock.at = time.monotonic() + self.deadlines.total
        body = bytearray()
        try:
            # Uncompressed answers only: httpx inflates each network read whole, so a gzip bomb
            # would pass max_answer_bytes many times over before the check below saw a byte.
            accept = {"Accept": "application/dicom+json", "Accept-Encoding": "identity"}
            with http.stream("GET", url, params=params, headers=accept) as answer:
                if answer.status_code == 204:
                    return []
                if answer.status_code != 200:
                    raise self._status_error(answer.status_code, path, answer.headers.get("location"))
                encoding = answer.headers.get("content-encoding", "identity").strip().lower()
                if encoding != "identity":
                    raise SourceError(
                        f"source {self.name}: {path} answered with Content-Encoding {quoted(encoding)} "
                        "although identity was asked for"
                    )
                for chunk in answer.iter_raw():
                    body += chunk
                    if len(body) > self.max_answer:
                        raise SourceError(
                            f"source {self.name}: {path} answered more than {self.max_answer} bytes "
                            "(max_answer_bytes); not read further"
                        )
                    if time.monotonic() > clock.at:
                        raise self._late(path)
        except httpx.HTTPError as exc:
            raise self._error(exc, path, clock.at) from exc
        finally:
            clock.at = math.inf
        try:
            parsed = orjson.loads(body) if body else []
        except orjson.JSONDecodeError as exc:
            raise SourceError(f"source {self.name}: {path} did not answer JSON ({exc})") from exc
        if not isinstance(parsed, list):
            raise SourceError(f"source {self.name}: {path} did not answer a JSON array")
        return parsed

    def _uid(self, item: Any, tag: str, where: str) -> str | None:
        """The UID at ``tag`` of an upstream answer, or None (logged) when it is missing or could
        change the structure of the URL paths it goes into."""
        value = _value(item, tag, default=None)
        if isinstance(value, str) and len(value) <= _UID_LENGTH and _UID.fullmatch(value):
            return value
        log.warning(
            "source %s: %s answered an item whose (%s,%s) is %s, not a UID: skipped",
            self.name,
            where,
            tag[:4],
            tag[4:],
            quoted(value),
        )
        return None

    def _entry(self, item: Any, path: str) -> Entry | None:
        """One instance from upstream metadata: BulkDataURIs re-pointed at this gateway."""
        uids = [self._uid(item, tag, path) for tag in ("0020000D", "0020000E", "00080018")]
        if None in uids:
            return None
        raw = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
        base = f"/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
        upstream: dict[str, str] = {}
        body = _repoint(item, f"{base}/bulk/", "", upstream)
        # PS3.18 F.2.6: a relative BulkDataURI is relative to the base URI of the response that
        # carried it, the /metadata URL (RFC 3986 5.1.3). Each URI is stored resolved; those that
        # leave the origin or the base path are stored too, but never fetched: serving checks
        # again (registries harvested before this check hold such URIs) and answers 502.
        metadata_url = self.origin.url(path)
        refused = []
        for tag_path, reference in upstream.items():
            upstream[tag_path] = self.origin.join(reference, metadata_url)
            try:
                self.origin.check(upstream[tag_path], f"BulkDataURI of {tag_path}")
            except OffOrigin as exc:
                refused.append(exc.message)
        if refused:  # once per instance: the first reason, and how many
            log.warning("%s (instance %s; %d refused in all)", refused[0], uids[2], len(refused))
        syntax = _value(item, "00020010", default=None)
        rows = _value(item, "00280010", default=None)
        number = _value(item, "00280008", default=1) or 1
        if not isinstance(number, int) and not (isinstance(number, str) and number.strip().isdigit()):
            log.warning(
                "source %s: %s answered instance %s with NumberOfFrames %s, not a number: skipped",
                self.name,
                path,
                uids[2],
                quoted(number),
            )
            return None
        frames = int(number) if rows else 0
        pixel = PixelInfo(
            transfer_syntax=syntax,
            mode="remote",
            encapsulated=bool(syntax and UID(syntax).is_encapsulated),
            vr=body.get("7FE00010", {}).get("vr", "OW"),
            value_offset=-1,
            value_length=-1,
            frames={"remote": frames, "bulk": upstream},
        )
        if rows and "7FE00010" not in body:
            body["7FE00010"] = {"vr": pixel.vr, "BulkDataURI": f"{base}/bulk/7FE00010"}
        # Size and a checksum of the metadata stand in for size and mtime: unchanged is skipped.
        return Entry(base, len(raw), zlib.crc32(raw), prepared=(body, pixel))

    # -- serving -------------------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        # Streaming uses aiohttp: measured against Orthanc, 1.0 ms of CPU per 512 KB frame where
        # httpx took 3.9 ms (its 64 KiB reads each cross several layers); harvest keeps httpx.
        if self._client is None or self._client.closed:
            self._client = aiohttp.ClientSession(
                headers=self.headers,
                # total: one deadline per request, from sending it to the body's last byte, so
                # waiting for the headers is under it too (sock_read alone restarts per read).
                timeout=aiohttp.ClientTimeout(
                    total=self.deadlines.total,
                    connect=self.deadlines.connect,
                    sock_read=self.deadlines.message,
                ),
                connector=aiohttp.TCPConnector(limit=32),
                auto_decompress=False,
            )
        return self._client

    async def aiter_instance(self, location: InstanceFile) -> AsyncIterator[bytes]:
        async for chunk in self._first_part(self.origin.url(location.path), location.path, _ANY_INSTANCE):
            if type(chunk) is bytes:
                yield chunk

    async def open_frame(self, location: Location, index: int) -> Frame:
        path = f"{location.path}/frames/{index + 1}"
        part = self._first_part(self.origin.url(path), path, _ANY_FRAME)
        first = await anext(part, b"")
        length = None
        if type(first) is int:  # the part's Content-Length, announced before its first byte
            length, first = first, await anext(part, b"")
        assert type(first) is bytes
        # After the length, only bytes come (``_first_part``).
        return Frame(first, cast(AsyncIterator[bytes], part), length)

    async def aiter_bulk(self, location: Location, tag_path: str) -> AsyncIterator[bytes]:
        uri = (location.frames or {}).get("bulk", {}).get(tag_path)
        if uri is None:
            raise NotFound(f"instance {location.SOPInstanceUID} has no bulk data at {tag_path}")
        # Checked again here, not only at harvest: registries harvested before the check hold
        # URIs that leave the origin, and what the policy allows is the configuration's of today.
        url = self.origin.check(uri, f"BulkDataURI of {tag_path} (instance {location.SOPInstanceUID})")
        async for chunk in self._first_part(url, urlsplit(url).path, _ANY_FRAME):
            if type(chunk) is bytes:
                yield chunk

    async def _first_part(self, url: str, path: str, accept: str) -> AsyncIterator[bytes | int]:
        """The body of the first part of an upstream multipart response at ``url`` (checked by the
        origin policy; ``path`` names it in messages), chunk by chunk, preceded by the part's
        Content-Length (an int, checked against what comes) when the upstream gives one."""
        expected, received = None, 0
        deadline = time.monotonic() + self.deadlines.total
        try:
            # allow_redirects=False: a 3xx is an error naming the source (see _status_error).
            async with self._session().get(
                url, headers={"Accept": accept}, allow_redirects=False
            ) as response:
                if response.status == 404:
                    raise NotFound(f"source {self.name} does not hold {path}")
                if response.status != 200:
                    raise self._status_error(response.status, path, response.headers.get("Location"))
                reader = MultipartReader(boundary_of(response.headers.get("Content-Type", "")))
                chunks = response.content.iter_any()
                headed = False
                async for chunk in chunks:
                    if time.monotonic() > deadline:
                        raise self._late(path)
                    for event in reader.feed(chunk):
                        if isinstance(event, Data):
                            received += len(event.data)
                            yield event.data
                        elif isinstance(event, Headers) and not headed:
                            headed = True
                            expected = _part_length(event.headers, path, self.name)
                            if expected is not None:
                                yield expected
                        elif isinstance(event, PartEnd):
                            if expected is not None and received != expected:
                                raise SourceError(
                                    f"source {self.name}: {path} sent {received} bytes in a part "
                                    f"announced as {expected}"
                                )
                            await _drain(chunks, deadline)
                            return
                raise SourceError(f"source {self.name}: {path} ended before its first part did")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._error(exc, path, deadline) from exc

    def _status_error(self, status: int, path: str, location: str | None) -> SourceError:
        if 300 <= status < 400:
            to = f" to {quoted(location)}" if location else ""
            return SourceError(
                f"source {self.name}: {path} answered {status}, a redirect{to}; redirects are not "
                "followed (a source is asked at its configured base URL only)"
            )
        return SourceError(f"source {self.name}: {path} answered {status}")

    def _late(self, path: str) -> SourceTimeout:
        return SourceTimeout(
            f"source {self.name}: {path} took longer than {self.deadlines.total:g} s (total_timeout)"
        )

    def _error(self, exc: Exception, path: str, deadline: float = math.inf) -> GatewayError:
        if isinstance(exc, httpx.TimeoutException | TimeoutError | aiohttp.ServerTimeoutError):
            if time.monotonic() >= deadline:
                return self._late(path)
            return SourceTimeout(
                f"source {self.name}: no answer for {path} within the deadline ({self._scrub(repr(exc))})"
            )
        if isinstance(exc, httpx.ConnectError | httpx.RemoteProtocolError | aiohttp.ClientConnectionError):
            if not isinstance(exc, aiohttp.ClientPayloadError):
                return SourceUnavailable(
                    f"source {self.name} at {self.origin.shown} is unreachable ({self._scrub(str(exc))})"
                )
        return SourceError(f"source {self.name}: {path} failed ({self._scrub(repr(exc))})")

    def _scrub(self, text: str) -> str:
        """A third-party error text without the source's header values or URL credentials."""
        secrets = [value for value in self.headers.values() if len(value) >= 4]
        userinfo = self.url.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[0]
        for secret in [*secrets, userinfo]:
            if secret:
                text = text.replace(secret, "***")
        return text

    async def health(self) -> str:
        try:
            url = self.origin.url("/studies")
        except OffOrigin as exc:
            return exc.message
        try:
            async with self._session().get(
                url,
                params={"limit": "1"},
                headers={"Accept": "application/dicom+json"},
                allow_redirects=False,
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._error(exc, "/studies").message
        if 300 <= status < 400:
            return f"QIDO answered {status}, a redirect (not followed)"
        return "ok" if status in (200, 204) else f"QIDO answered {status}"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


async def _drain(chunks: AsyncIterator[bytes], deadline: float) -> None:
    """Read the (short) rest after the first part, the closing delimiter: a connection whose body
    was left unread cannot be reused, and a new one per frame costs more than the frame. Bounded:
    an upstream sending more, or late, gets its connection closed instead (aiohttp closes a
    connection released with its body unread)."""
    left = _DRAIN
    async for chunk in chunks:
        left -= len(chunk)
        if left < 0 or time.monotonic() > deadline:
            return


class _Clock(httpcore.NetworkBackend):
    """httpcore's blocking network backend with one deadline (``at``, monotonic) over every
    connect, read and write of an exchange.

    httpx's timeouts are per socket operation: an upstream sending its status line and headers a
    byte at a time would never trip them, and a check between body chunks starts only once the
    headers are in. Here each operation gets at most the time left before ``at``, and none starts
    after it, so the total deadline covers connecting and waiting for the headers too."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()
        self.at = math.inf

    def left(self, timeout: float | None, error: type[Exception]) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise error("the exchange's total deadline passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = self.left(timeout, httpcore.ConnectTimeout)
        return _ClockedStream(
            self._backend.connect_tcp(host, port, timeout, local_address, socket_options), self
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        timeout = self.left(timeout, httpcore.ConnectTimeout)
        return _ClockedStream(self._backend.connect_unix_socket(path, timeout, socket_options), self)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _ClockedStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, clock: _Clock) -> None:
        self._stream, self._clock = stream, clock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._clock.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._clock.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> Any:
        timeout = self._clock.left(timeout, httpcore.ConnectTimeout)
        return _ClockedStream(self._stream.start_tls(ssl_context, server_hostname, timeout), self._clock)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _transport(clock: _Clock) -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport()
    # httpx takes no network backend; its connection pool is rebuilt around ours with httpcore's
    # public API (the trickled-headers test fails if this stops taking effect).
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(), network_backend=clock, keepalive_expiry=5.0
    )
    return transport


def _part_length(headers: dict[str, str], path: str, source: str) -> int | None:
    value = next((v for k, v in headers.items() if k.lower() == "content-length"), None)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise SourceError(f"source {source}: {path} sent a part with Content-Length {value!r}")
    return int(value)


def _value(item: Any, tag: str, default: Any = ...) -> Any:
    element = item.get(tag) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    if isinstance(values, list) and values:
        return values[0]
    if default is ...:
        raise SourceError(f"upstream metadata lacks ({tag[:4]},{tag[4:]})")
    return default


def _repoint(node: Any, base: str, prefix: str, upstream: dict[str, str]) -> Any:
    """A copy of ``node`` with every BulkDataURI pointing at this gateway; the upstream URI of each
    tag path is recorded in ``upstream`` as given (the caller resolves and checks it)."""
    out: dict[str, Any] = {}
    for tag, element in node.items():
        if not isinstance(element, dict):
            out[tag] = element
            continue
        path = prefix + tag
        element = dict(element)
        if "BulkDataURI" in element:
            upstream[path] = str(element["BulkDataURI"])
            element["BulkDataURI"] = base + path
        if element.get("vr") == "SQ" and element.get("Value"):
            element["Value"] = [
                _repoint(item, base, f"{path}/{index}/", upstream) if isinstance(item, dict) else item
                for index, item in enumerate(element["Value"])
            ]
        out[tag] = element
    return out
