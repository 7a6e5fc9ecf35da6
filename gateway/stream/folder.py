"""A folder of DICOM files as a source (for example a read-only mount of a PACS's storage).

Frames are read at the offsets recorded at harvest, with ``os.pread`` in a worker thread: no
parsing on the request path. Deflated files are the exception (``mode == "decode"``): their frames
need the dataset inflated, which pydicom does for that one instance.

What is in the folder is not trusted after indexing, nor while listing it:

* Listing (``scan``, and ``scan_paths`` for what a watch reported) is ``gateway.stream.listing``'s:
  no recursion, at most ``MAX_DEPTH`` levels, no directory link followed, and what will not be
  read handed to harvest as a refused entry with its reason.
* Every open, at harvest and to serve, goes through ``SafeOpener.open``
  (``gateway.stream.safeopen``): resolved one component at a time from the folder, the kernel
  never following a link for us, links followed only while they stay in the folder, and only a
  regular file opened (``O_NONBLOCK``, then ``fstat``), so a FIFO swapped in cannot hang a reader.
* Before a byte is served, the opened descriptor's size and modification time must equal what was
  indexed and the frame's byte ranges must lie within that size; after the bytes are read, the
  descriptor is checked again. A file that changed is refused with a ``SourceError`` (502) naming
  the source, so the federation tries the instance's next location; the next harvest re-indexes it
  (its size or time differ), and ``changed``, given to the constructor, tells the service, which
  harvests that path at once (``Gateway._changed``).
* Watching (``watch``, unless turned off) reports changed paths as they happen (``gateway.stream.
  watch``); ``scan_paths`` lists just those paths with the checks of ``scan``, so a new file in a
  folder of 100,000 is indexed without walking them all. The full ``scan`` stays the truth.

What this guarantees: the bytes served were read from one descriptor, of a regular file reached
from the folder without leaving it, whose size and modification time were those indexed before and
after the read. A link swapped in at any moment makes the open fail rather than redirect it. Not
covered: a writer that rewrites a file in place at the same size and then restores its modification
time; a directory moved out of the folder while it is being walked (this needs write access to the
folder's parent file system); a hard link (it is the file, inside by definition).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from gateway.codec import framemap
from gateway.codec.dicomfile import bulk_value, read_header, to_little_endian
from gateway.errors import DicomFileError, NotFound, SourceError
from gateway.redact import escape
from gateway.stream import listing
from gateway.stream.listing import MAX_DEPTH
from gateway.stream.safeopen import SafeOpener
from gateway.stream.source import CHUNK, BatchRetrieval, Frame, Stop, Watcher
from gateway.stream.watch import watch_folder
from gateway.types import Entry, InstanceFile, Location, PixelInfo

__all__ = ["FolderSource", "MAX_DEPTH"]  # MAX_DEPTH: listing's bound, named here for callers

T = TypeVar("T")
_READERS = 16  # concurrent reads per folder: enough to keep a disk queue busy


def _change(size: int, mtime_ns: int | None, st: os.stat_result) -> str:
    """How a file differs from what was indexed, for the error message."""
    if st.st_size < size:
        return f"shrank from {size} to {st.st_size} bytes"
    if st.st_size > size:
        return f"grew from {size} to {st.st_size} bytes"
    return f"rewritten: modified at {_when(st.st_mtime_ns)}, indexed as of {_when(mtime_ns or 0)}"


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


class FolderSource:
    kind = "filesystem"

    batch: BatchRetrieval | None = None  # one file per instance: nothing to gain from batches
    learns_on_retrieve = False  # harvest reads every header whole

    def __init__(
        self, name: str, root: Path, changed: Callable[[str], None] | None = None, watch: bool = True
    ) -> None:
        self.name = name
        self.root = Path(root)
        self.watch: Watcher | None = self if watch else None  # ``watch_changes``, ``scan_paths``
        # Called with a file's path when serving finds it changed since it was indexed, from a
        # reader thread: the service may harvest this source sooner than its interval.
        self.changed = changed
        self._opener = SafeOpener(self.root)  # every open of a file of the folder goes through it
        self._executor: ThreadPoolExecutor | None = None  # made on first read; never pickled

    def __getstate__(self) -> dict[str, object]:
        # Harvest sends the source to worker processes; the reader threads stay here (the opener
        # goes without its cached real path: ``SafeOpener.__getstate__``).
        state = {"name": self.name, "root": self.root, "changed": None, "_executor": None}
        return {**state, "_opener": self._opener, "watch": None}  # and the watch: harvest lists here

    def _run(self, function: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Blocking file work on this source's reader threads (the event loop's plain executor
        costs a third of anyio's ``to_thread`` per call, which matters once per frame)."""
        return asyncio.get_running_loop().run_in_executor(self._readers(), function, *args)

    def _readers(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(_READERS, thread_name_prefix=f"read-{self.name}")
        return self._executor

    # -- harvest ------------------------------------------------------------------------------

    def scan(self, since: str | None = None) -> Iterator[Entry]:  # a folder is always listed whole
        if not self.root.is_dir():
            raise SourceError(f"source {self.name}: folder {self.root} does not exist")
        return listing.walk(self.name, self._opener)

    # -- watching -----------------------------------------------------------------------------

    async def watch_changes(self, changed: Callable[[set[str]], None], stop: Stop) -> None:
        await watch_folder(self.root, changed, stop)

    def scan_paths(self, paths: Collection[str]) -> Iterator[Entry]:
        """What ``scan`` lists at or under each path (``listing.walk_paths``)."""
        if not self.root.is_dir():
            raise SourceError(f"source {self.name}: folder {self.root} does not exist")
        yield from listing.walk_paths(self.name, self._opener, paths)

    def read_header(self, entry: Entry) -> tuple[Dataset, PixelInfo | None]:
        if entry.refused is not None:
            raise DicomFileError(entry.refused)
        try:
            fd, st = self._opener.open(entry.path)
        except FileNotFoundError:
            raise DicomFileError("vanished before it could be read") from None
        except OSError as exc:
            raise DicomFileError(f"cannot be opened ({exc.strerror})") from exc
        with os.fdopen(fd, "rb") as fp:
            # Indexed under the stamp the listing saw: the content must be the one it describes.
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                raise DicomFileError("changed while being indexed; read again at the next harvest")
            header = read_header(fp)
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                raise DicomFileError("changed while being indexed; read again at the next harvest")
        return header

    # -- serving ------------------------------------------------------------------------------

    def _open(self, location: Location | InstanceFile) -> int:
        """A descriptor on ``location``'s file, which is still the file indexed."""
        try:
            fd, st = self._opener.open(location.path)
        except FileNotFoundError:
            raise NotFound(
                f"instance {location.SOPInstanceUID} is indexed but its file is gone from source "
                f"{self.name}; the next harvest will drop it"
            ) from None
        except DicomFileError as exc:
            raise SourceError(
                f"source {self.name}: {escape(location.path)} is not served: {exc.message}"
            ) from exc
        except OSError as exc:
            raise SourceError(
                f"source {self.name}: cannot open {escape(location.path)}: {exc.strerror}"
            ) from exc
        try:
            self._unchanged(st, location)
        except SourceError:
            os.close(fd)
            raise
        return fd

    def _unchanged(self, st: os.stat_result, location: Location | InstanceFile) -> None:
        if st.st_size == location.size and location.mtime_ns in (None, st.st_mtime_ns):
            return
        if self.changed is not None:
            self.changed(location.path)
        raise SourceError(
            f"source {self.name}: {escape(location.path)} changed since it was indexed "
            f"({_change(location.size, location.mtime_ns, st)}); not served until the next harvest "
            "indexes it again"
        )

    def _pread(self, fd: int, length: int, offset: int, location: Location | InstanceFile) -> bytes:
        """Bytes read, then the descriptor checked again: what a writer changed meanwhile is
        refused before it is sent."""
        data = os.pread(fd, length, offset)
        self._unchanged(os.fstat(fd), location)
        return data

    async def aiter_instance(self, location: InstanceFile) -> AsyncIterator[bytes]:
        if location.size <= CHUNK:
            # Most instances (one CT slice is ~0.5 MB): open, read, close in one thread hop.
            yield await self._run(self._read_whole, location)
            return
        fd = await self._run(self._open, location)
        try:
            offset = 0
            while offset < location.size:
                chunk = await self._run(self._pread, fd, CHUNK, offset, location)
                if not chunk:
                    raise SourceError(f"source {self.name}: {escape(location.path)} shrank while being sent")
                offset += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    def _read_whole(self, location: InstanceFile) -> bytes:
        fd = self._open(location)
        try:
            data = self._pread(fd, location.size, 0, location)
        finally:
            os.close(fd)
        if len(data) != location.size:
            raise SourceError(f"source {self.name}: {escape(location.path)} shrank while being sent")
        return data

    async def open_frame(self, location: Location, index: int) -> Frame:
        if location.mode == "decode":
            data = await self._run(self._decoded_frame, location, index)
            return Frame(data, None, len(data))
        assert location.frames is not None
        fragments = framemap.frame_fragments(location.frames, index)
        if not framemap.within(fragments, location.size):
            raise SourceError(
                f"source {self.name}: frame {index + 1} of instance {location.SOPInstanceUID} lies "
                f"outside its file as indexed ({location.size} bytes): not served"
            )
        length = sum(length for _, length in fragments)
        if length <= CHUNK:
            # The common case (one CT or MR frame): one worker-thread hop for open, read, close.
            return Frame(await self._run(self._read_small, location, fragments), None, length)
        chunks = self._aiter_fragments(location, fragments)
        return Frame(await anext(chunks), chunks, length)

    async def _aiter_fragments(
        self, location: Location, fragments: tuple[tuple[int, int], ...]
    ) -> AsyncIterator[bytes]:
        fd = await self._run(self._open, location)
        try:
            for offset, length in fragments:
                end = offset + length
                while offset < end:
                    chunk = await self._run(self._pread, fd, min(CHUNK, end - offset), offset, location)
                    if not chunk:
                        raise SourceError(
                            f"source {self.name}: {escape(location.path)} is shorter than indexed"
                        )
                    offset += len(chunk)
                    yield to_little_endian(chunk, location.swap) if location.swap else chunk
        finally:
            os.close(fd)

    def _read_small(self, location: Location, fragments: tuple[tuple[int, int], ...]) -> bytes:
        fd = self._open(location)
        try:
            parts = [os.pread(fd, length, offset) for offset, length in fragments]
            self._unchanged(os.fstat(fd), location)
        finally:
            os.close(fd)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) != sum(length for _, length in fragments):
            raise SourceError(f"source {self.name}: {escape(location.path)} is shorter than indexed")
        return to_little_endian(data, location.swap) if location.swap else data

    def _decoded_frame(self, location: Location, index: int) -> bytes:
        import pydicom

        fd = self._open(location)
        with os.fdopen(fd, "rb") as fp:
            try:
                ds = pydicom.dcmread(fp)
                pixels: bytes = ds.PixelData
            except Exception as exc:  # pydicom's many error types on a file that changed under us
                raise SourceError(
                    f"source {self.name}: cannot decode {escape(location.path)}: {exc}"
                ) from exc
            self._unchanged(os.fstat(fd), location)
        length = framemap.frame_length(
            int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1)), int(ds.get("BitsAllocated", 16))
        )
        return pixels[index * length : (index + 1) * length]

    async def aiter_bulk(self, location: Location, tag_path: str) -> AsyncIterator[bytes]:
        yield await self._run(self._bulk_value, location, tag_path)

    def _bulk_value(self, location: Location, tag_path: str) -> bytes:
        fd = self._open(location)
        with os.fdopen(fd, "rb") as fp:
            try:
                value = bulk_value(fp, tag_path, location.SOPInstanceUID)
            except DicomFileError as exc:
                raise SourceError(
                    f"source {self.name}: cannot read {escape(location.path)}: {exc.message}"
                ) from exc
            self._unchanged(os.fstat(fd), location)
        return value

    async def health(self) -> str:
        return "ok" if await self._run(self.root.is_dir) else f"folder {self.root} is missing"

    async def aclose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
