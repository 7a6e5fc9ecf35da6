"""An in-memory source: the whole contract over instances held as bytes, for tests and benchmarks
(httpx's ``MockTransport`` plays this part for transports).

Instances are given as Part 10 bytes or pydicom datasets. Harvest lists and reads them like files
(``scan``, ``read_header``, with the codecs the folder source uses); frames are served from the
frame map harvest recorded. What a real source does to its callers can be set, and changed between
requests, on the instance:

* ``error``: raised before the first byte of every read (an unreachable PACS:
  ``SourceUnavailable``; a missing file: ``NotFound``); with ``error_after``, raised after that
  many chunks instead, once bytes have been sent;
* ``delay``: seconds before the first byte (``math.inf``: a source that hangs); a delay longer
  than ``deadline`` ends, like a real source's total deadline, in ``SourceTimeout`` at the deadline;
* ``status``: what ``health`` answers;
* ``chunk``: the size of the chunks sent, to make streams of several chunks.

Made with ``watch=True``, it is a watched source (``Source.watch``): ``add`` and ``remove`` are
reported as changes of their paths, as a watched folder reports files copied in or deleted.

``asked`` records every read, in order (``("frame", uid, index)`` and the like), so tests can tell
which locations were tried.
"""

from __future__ import annotations

import asyncio
import io
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterable, Iterator
from typing import Any

from pydicom.dataset import Dataset

from gateway.codec import framemap
from gateway.codec.dicomfile import bulk_value, frame_of, read_header, to_little_endian
from gateway.errors import DicomFileError, GatewayError, NotFound, SourceError, SourceTimeout
from gateway.stream.source import CHUNK, BatchRetrieval, Frame, Stop, Watcher
from gateway.types import Entry, InstanceFile, Location, PixelInfo

__all__ = ["MemorySource"]


class MemorySource:
    kind = "memory"

    def __init__(
        self,
        name: str = "memory",
        instances: Iterable[bytes | Dataset] = (),
        *,
        error: GatewayError | None = None,
        error_after: int | None = None,
        delay: float = 0.0,
        deadline: float = 30.0,
        status: str = "ok",
        chunk: int = CHUNK,
        batch: bool = False,
        learns_on_retrieve: bool = False,
        learn: Callable[[str, bytes], None] | None = None,
        watch: bool = False,
    ) -> None:
        """``batch``: offer ``aiter_instances`` (``Source.batch``). ``learns_on_retrieve`` and
        ``learn``: declare that harvest's answers are partial, and what is called with each
        instance retrieved (its path and bytes), like a DIMSE PACS."""
        self.name = name
        self.error = error
        self.error_after = error_after
        self.delay = delay
        self.deadline = deadline
        self.status = status
        self.chunk = chunk
        self.batch: BatchRetrieval | None = self if batch else None
        self.learns_on_retrieve = learns_on_retrieve
        self.learn = learn
        self.watch: Watcher | None = self if watch else None
        self._changes: set[str] = set()  # paths added or removed, not yet reported
        self.asked: list[tuple[Any, ...]] = []
        self._held: dict[str, bytes] = {}  # Part 10 bytes by path
        self._paths: dict[str, str] = {}  # path by SOP Instance UID
        for instance in instances:
            self.add(instance)

    def add(self, instance: bytes | Dataset) -> str:
        """Hold one more instance (replacing one of the same SOP Instance UID); its path."""
        data = _part10(instance) if isinstance(instance, Dataset) else bytes(instance)
        ds, _ = _header(data)
        path = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        self._held[path] = data
        self._paths[str(ds.SOPInstanceUID)] = path
        self._changes.add(path)
        return path

    def remove(self, uid: str) -> None:
        path = self._paths.pop(uid)
        self._held.pop(path)
        self._changes.add(path)

    # -- watching (``watch=True``) ----------------------------------------------------------------

    async def watch_changes(self, changed: Callable[[set[str]], None], stop: Stop) -> None:
        while not stop.is_set():
            if self._changes:
                paths, self._changes = self._changes, set()
                changed(paths)
            await asyncio.sleep(0.01)  # a fake's debounce

    def scan_paths(self, paths: Collection[str]) -> Iterator[Entry]:
        for path in sorted(paths):
            data = self._held.get(path)
            if data is not None:
                yield Entry(path, len(data), zlib.crc32(data))

    # -- what harvest would record, for tests that need no registry ---------------------------------

    def location(self, uid: str) -> Location:
        """The location of the instance ``uid`` as harvest records it."""
        path = self._paths[uid]
        ds, pixel = _header(self._held[path])
        return Location(
            source=self.name,
            path=path,
            size=len(self._held[path]),
            SOPInstanceUID=str(ds.SOPInstanceUID),
            SeriesInstanceUID=str(ds.SeriesInstanceUID),
            StudyInstanceUID=str(ds.StudyInstanceUID),
            TransferSyntaxUID=pixel.transfer_syntax if pixel else None,
            mode=pixel.mode if pixel else None,
            encapsulated=bool(pixel and pixel.encapsulated),
            frames=pixel.frames if pixel else None,
            frame_error=pixel.frame_error if pixel else None,
            swap=pixel.swap_width if pixel else 0,
            SOPClassUID=str(ds.SOPClassUID),
        )

    def instance_file(self, uid: str) -> InstanceFile:
        """Where the instance ``uid``'s whole file can be read, as the registry says it."""
        location = self.location(uid)
        return InstanceFile(
            self.name,
            location.path,
            location.size,
            location.TransferSyntaxUID,
            location.SOPInstanceUID,
            location.mode,
            location.SOPClassUID,
        )

    # -- harvest ----------------------------------------------------------------------------------

    def scan(self, since: str | None = None) -> Iterator[Entry]:  # held whole: listed whole
        for path, data in list(self._held.items()):
            yield Entry(path, len(data), zlib.crc32(data))

    def read_header(self, entry: Entry) -> tuple[Dataset, PixelInfo | None]:
        data = self._held.get(entry.path)
        if data is None:
            raise DicomFileError("no longer held")
        return _header(data)

    # -- serving ----------------------------------------------------------------------------------

    async def aiter_instance(self, location: InstanceFile) -> AsyncIterator[bytes]:
        self.asked.append(("instance", location.SOPInstanceUID))
        data = await self._before_first_byte(location.path, location.SOPInstanceUID)
        if self.learn is not None:
            self.learn(location.path, data)
        async for chunk in self._chunks(data):
            yield chunk

    async def open_frame(self, location: Location, index: int) -> Frame:
        self.asked.append(("frame", location.SOPInstanceUID, index))
        data = await self._before_first_byte(location.path, location.SOPInstanceUID)
        frame = _frame(data, location, index)
        if len(frame) <= self.chunk and self.error_after is None:
            return Frame(frame, None, len(frame))
        chunks = self._chunks(frame)
        return Frame(await anext(chunks, b""), chunks, len(frame))

    async def aiter_bulk(self, location: Location, tag_path: str) -> AsyncIterator[bytes]:
        self.asked.append(("bulk", location.SOPInstanceUID, tag_path))
        data = await self._before_first_byte(location.path, location.SOPInstanceUID)
        try:
            value = bulk_value(data, tag_path, location.SOPInstanceUID)
        except DicomFileError as exc:
            raise SourceError(f"source {self.name}: {exc.message}") from exc
        async for chunk in self._chunks(value):
            yield chunk

    async def aiter_instances(self, locations: list[InstanceFile]) -> AsyncGenerator[bytes, None]:
        """Several instances in one retrieval (when made with ``batch=True``)."""
        self.asked.append(("instances", *(location.SOPInstanceUID for location in locations)))
        for location in locations:
            data = await self._before_first_byte(location.path, location.SOPInstanceUID)
            if self.learn is not None:
                self.learn(location.path, data)
            yield data

    async def _before_first_byte(self, path: str, uid: str) -> bytes:
        """What a real source goes through before its first byte: waiting, a deadline, errors."""
        if self.delay:
            if self.delay > self.deadline:
                await asyncio.sleep(self.deadline)
                raise SourceTimeout(f"source {self.name}: no answer within {self.deadline:g} s")
            await asyncio.sleep(self.delay)
        if self.error is not None and self.error_after is None:
            raise self.error
        data = self._held.get(path)
        if data is None:
            raise NotFound(f"source {self.name} does not hold instance {uid}")
        return data

    async def _chunks(self, data: bytes) -> AsyncIterator[bytes]:
        for sent, start in enumerate(range(0, len(data), self.chunk)):
            if self.error is not None and self.error_after is not None and sent >= self.error_after:
                raise self.error
            yield data[start : start + self.chunk]
            await asyncio.sleep(0)  # as a socket would, let others run between chunks
        if self.error is not None and self.error_after is not None:
            raise self.error  # every chunk sent, then the end cut off

    async def health(self) -> str:
        return self.status

    async def aclose(self) -> None:
        pass


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _header(data: bytes) -> tuple[Dataset, PixelInfo | None]:
    return read_header(io.BytesIO(data))


def _frame(data: bytes, location: Location, index: int) -> bytes:
    """Frame ``index`` as the folder source serves it: from the recorded frame map."""
    if location.frames is None or location.mode not in ("direct", "swap"):
        try:
            return frame_of(data, index)  # decoded (deflated), or a map the index does not have
        except DicomFileError as exc:
            raise SourceError(f"source {location.source}: {exc.message}") from exc
    if not 0 <= index < framemap.frame_count(location.frames):
        raise NotFound(f"frame {index + 1} of instance {location.SOPInstanceUID} does not exist")
    fragments = framemap.frame_fragments(location.frames, index)
    if not framemap.within(fragments, len(data)):
        raise SourceError(f"source {location.source}: frame {index + 1} lies outside the instance")
    frame = b"".join(data[offset : offset + length] for offset, length in fragments)
    return to_little_endian(frame, location.swap) if location.swap else frame
