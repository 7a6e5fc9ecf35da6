"""An upstream DICOMweb service as a source: a PACS's DICOMweb endpoint, or another gateway.

Harvest walks QIDO-RS (studies, then their series) and reads each series' WADO-RS ``/metadata``
once; the instances' DICOM JSON is stored with BulkDataURIs pointing at this gateway, the upstream
URIs kept beside the location. Retrieval streams WADO-RS straight through: the upstream multipart
body is parsed as it arrives and each part's bytes are passed on, never buffered whole.

Deadlines (PS3.18 does not set them; users of peers ask for them, dicomweb-client#87): connecting,
each message (a chunk), and each whole exchange, which a trickle of slow chunks cannot extend.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urljoin

import aiohttp
import httpx
import orjson
from pydicom.uid import UID

from gateway.config import SourceConfig
from gateway.errors import GatewayError, NotFound, SourceError, SourceTimeout, SourceUnavailable
from gateway.registry.store import InstanceFile, Location
from gateway.stream.dicomfile import PixelInfo
from gateway.stream.multipart_reader import Data, Headers, MultipartReader, PartEnd, boundary_of
from gateway.stream.source import Entry

__all__ = ["DicomwebSource"]

_PAGE = 500  # studies per QIDO page
_ANY_INSTANCE = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_ANY_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


class DicomwebSource:
    kind = "dicomweb"

    def __init__(self, config: SourceConfig) -> None:
        assert config.url is not None
        self.name = config.name
        self.url = config.url
        self.headers = dict(config.headers)
        self.deadlines = config.deadlines
        self._client: aiohttp.ClientSession | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.deadlines.message, connect=self.deadlines.connect)

    # -- harvest (blocking, in a worker thread) ------------------------------------------------------

    def scan(self, since: str | None = None) -> Iterator[Entry]:
        window = {"StudyDate": f"{since}-"} if since else {}
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self._timeout()) as http:
            offset = 0
            while True:
                page = {"limit": str(_PAGE), "offset": str(offset), **window}
                studies = self._json(http, "/studies", page)
                for study in studies:
                    study_uid = _value(study, "0020000D")
                    for series in self._json(http, f"/studies/{study_uid}/series", {}):
                        series_uid = _value(series, "0020000E")
                        path = f"/studies/{study_uid}/series/{series_uid}/metadata"
                        for item in self._json(http, path, {}):
                            yield self._entry(item)
                if len(studies) < _PAGE:
                    return
                offset += _PAGE

    def read_header(self, entry: Entry) -> Any:
        raise SourceError(f"source {self.name}: entries come with their metadata")  # never called

    def _json(self, http: httpx.Client, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        started = time.monotonic()
        try:
            response = http.get(path, params=params, headers={"Accept": "application/dicom+json"})
        except httpx.HTTPError as exc:
            raise self._error(exc, path) from exc
        if time.monotonic() - started > self.deadlines.total:
            raise SourceTimeout(f"source {self.name}: {path} took longer than {self.deadlines.total:g} s")
        if response.status_code == 204:
            return []
        if response.status_code != 200:
            raise SourceError(f"source {self.name}: {path} answered {response.status_code}")
        try:
            body = orjson.loads(response.content) if response.content else []
        except orjson.JSONDecodeError as exc:
            raise SourceError(f"source {self.name}: {path} did not answer JSON ({exc})") from exc
        if not isinstance(body, list):
            raise SourceError(f"source {self.name}: {path} did not answer a JSON array")
        return body

    def _entry(self, item: dict[str, Any]) -> Entry:
        """One instance from upstream metadata: BulkDataURIs re-pointed at this gateway."""
        raw = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
        uids = (_value(item, "0020000D"), _value(item, "0020000E"), _value(item, "00080018"))
        base = f"/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
        upstream: dict[str, str] = {}
        body = _repoint(item, f"{base}/bulk/", "", upstream, self.url + base)
        syntax = _value(item, "00020010", default=None)
        rows = _value(item, "00280010", default=None)
        frames = int(_value(item, "00280008", default=1) or 1) if rows else 0
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
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.deadlines.connect, sock_read=self.deadlines.message
                ),
                connector=aiohttp.TCPConnector(limit=32),
                auto_decompress=False,
            )
        return self._client

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.url + path

    async def aiter_instance(self, location: InstanceFile) -> AsyncIterator[bytes]:
        async for chunk in self._first_part(location.path, _ANY_INSTANCE):
            yield chunk

    async def aiter_frame(
        self, location: Location, index: int, meta: dict[str, int] | None = None
    ) -> AsyncIterator[bytes]:
        async for chunk in self._first_part(f"{location.path}/frames/{index + 1}", _ANY_FRAME, meta):
            yield chunk

    async def aiter_bulk(self, location: Location, tag_path: str) -> AsyncIterator[bytes]:
        uri = (location.frames or {}).get("bulk", {}).get(tag_path)
        if uri is None:
            raise NotFound(f"instance {location.SOPInstanceUID} has no bulk data at {tag_path}")
        async for chunk in self._first_part(uri, _ANY_FRAME):
            yield chunk

    async def _first_part(
        self, path: str, accept: str, meta: dict[str, int] | None = None
    ) -> AsyncIterator[bytes]:
        """The body of the first part of an upstream multipart response, chunk by chunk; the
        part's Content-Length, when the upstream gives one, in ``meta["length"]``, checked."""
        expected, received = None, 0
        deadline = time.monotonic() + self.deadlines.total
        try:
            async with self._session().get(self._url(path), headers={"Accept": accept}) as response:
                self._check(response.status, path)
                reader = MultipartReader(boundary_of(response.headers.get("Content-Type", "")))
                chunks = response.content.iter_any()
                async for chunk in chunks:
                    if time.monotonic() > deadline:
                        raise SourceTimeout(
                            f"source {self.name}: {path} took longer than {self.deadlines.total:g} s"
                        )
                    for event in reader.feed(chunk):
                        if isinstance(event, Data):
                            received += len(event.data)
                            yield event.data
                        elif isinstance(event, Headers) and expected is None:
                            expected = _part_length(event.headers, path, self.name)
                            if meta is not None and expected is not None:
                                meta["length"] = expected
                        elif isinstance(event, PartEnd):
                            if expected is not None and received != expected:
                                raise SourceError(
                                    f"source {self.name}: {path} sent {received} bytes in a part "
                                    f"announced as {expected}"
                                )
                            # Read the (short) rest, the closing delimiter: a connection whose
                            # body was left unread cannot be reused, and a new one per frame
                            # costs more than the frame.
                            async for _ in chunks:
                                pass
                            return
                raise SourceError(f"source {self.name}: {path} ended before its first part did")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._error(exc, path) from exc

    def _check(self, status: int, path: str) -> None:
        if status == 200:
            return
        if status == 404:
            raise NotFound(f"source {self.name} does not hold {path}")
        raise SourceError(f"source {self.name}: {path} answered {status}")

    def _error(self, exc: Exception, path: str) -> GatewayError:
        if isinstance(exc, httpx.TimeoutException | TimeoutError | aiohttp.ServerTimeoutError):
            return SourceTimeout(f"source {self.name}: no answer for {path} within the deadline ({exc!r})")
        if isinstance(exc, httpx.ConnectError | httpx.RemoteProtocolError | aiohttp.ClientConnectionError):
            if not isinstance(exc, aiohttp.ClientPayloadError):
                return SourceUnavailable(f"source {self.name} at {self.url} is unreachable ({exc})")
        return SourceError(f"source {self.name}: {path} failed ({exc!r})")

    async def health(self) -> str:
        try:
            async with self._session().get(
                self._url("/studies"), params={"limit": "1"}, headers={"Accept": "application/dicom+json"}
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._error(exc, "/studies").message
        return "ok" if status in (200, 204) else f"QIDO answered {status}"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _part_length(headers: dict[str, str], path: str, source: str) -> int | None:
    value = next((v for k, v in headers.items() if k.lower() == "content-length"), None)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise SourceError(f"source {source}: {path} sent a part with Content-Length {value!r}")
    return int(value)


def _value(item: dict[str, Any], tag: str, default: Any = ...) -> Any:
    values = item.get(tag, {}).get("Value")
    if values:
        return values[0]
    if default is ...:
        raise SourceError(f"upstream metadata lacks ({tag[:4]},{tag[4:]})")
    return default


def _repoint(node: Any, base: str, prefix: str, upstream: dict[str, str], upstream_base: str) -> Any:
    """A copy of ``node`` with every BulkDataURI pointing at this gateway; the upstream URI of each
    tag path is recorded in ``upstream`` (made absolute)."""
    out: dict[str, Any] = {}
    for tag, element in node.items():
        if not isinstance(element, dict):
            out[tag] = element
            continue
        path = prefix + tag
        element = dict(element)
        if "BulkDataURI" in element:
            upstream[path] = urljoin(upstream_base + "/", element["BulkDataURI"])
            element["BulkDataURI"] = base + path
        if element.get("vr") == "SQ" and element.get("Value"):
            element["Value"] = [
                _repoint(item, base, f"{path}/{index}/", upstream, upstream_base)
                for index, item in enumerate(element["Value"])
            ]
        out[tag] = element
    return out
