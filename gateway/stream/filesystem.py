"""A folder of DICOM files as a source (for example a read-only mount of a PACS's storage).

Frames are read at the offsets recorded at harvest, with ``os.pread`` in a worker thread: no
parsing on the request path. Deflated files are the exception (``mode == "decode"``): their frames
need the dataset inflated, which pydicom does for that one instance.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from gateway.errors import DicomFileError, NotFound, SourceError
from gateway.registry.store import InstanceFile, Location
from gateway.stream import framemap
from gateway.stream.dicomfile import PixelInfo, bulk_value, read_header, to_little_endian
from gateway.stream.source import CHUNK, Entry

__all__ = ["FolderSource"]

T = TypeVar("T")
_READERS = 16  # concurrent reads per folder: enough to keep a disk queue busy


class FolderSource:
    kind = "filesystem"

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = Path(root)
        self._executor: ThreadPoolExecutor | None = None  # made on first read; never pickled

    def __getstate__(self) -> dict[str, object]:
        # Harvest sends the source to worker processes; the reader threads stay here.
        return {"name": self.name, "root": self.root, "_executor": None}

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
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                full = os.path.join(dirpath, filename)
                try:
                    st = os.stat(full)
                except OSError:
                    continue  # vanished between listing and stat: it will be seen as removed
                rel = os.path.relpath(full, self.root)
                yield Entry(rel, st.st_size, st.st_mtime_ns)

    def read_header(self, entry: Entry) -> tuple[Dataset, PixelInfo | None]:
        return read_header(self.root / entry.path)

    # -- serving ------------------------------------------------------------------------------

    def _open(self, location: Location | InstanceFile) -> int:
        try:
            return os.open(self.root / location.path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(
                f"instance {location.SOPInstanceUID} is indexed but its file is gone from source "
                f"{self.name}; the next harvest will drop it"
            ) from None
        except OSError as exc:
            raise SourceError(f"source {self.name}: cannot open {location.path}: {exc.strerror}") from exc

    async def aiter_instance(self, location: InstanceFile) -> AsyncIterator[bytes]:
        if location.size <= CHUNK:
            # Most instances (one CT slice is ~0.5 MB): open, read, close in one thread hop.
            yield await self._run(self._read_whole, location)
            return
        fd = await self._run(self._open, location)
        try:
            offset = 0
            while offset < location.size:
                chunk = await self._run(os.pread, fd, CHUNK, offset)
                if not chunk:
                    raise SourceError(f"source {self.name}: {location.path} shrank while being sent")
                offset += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    def _read_whole(self, location: InstanceFile) -> bytes:
        fd = self._open(location)
        try:
            data = os.pread(fd, location.size, 0)
        finally:
            os.close(fd)
        if len(data) != location.size:
            raise SourceError(f"source {self.name}: {location.path} shrank while being sent")
        return data

    async def aiter_frame(
        self, location: Location, index: int, meta: dict[str, int] | None = None
    ) -> AsyncIterator[bytes]:  # lengths are in the frame map: nothing to report
        if location.mode == "decode":
            yield await self._run(self._decoded_frame, location, index)
            return
        assert location.frames is not None
        fragments = framemap.frame_fragments(location.frames, index)
        if sum(length for _, length in fragments) <= CHUNK:
            # The common case (one CT or MR frame): one worker-thread hop for open, read, close.
            yield await self._run(self._read_small, location, fragments)
            return
        fd = await self._run(self._open, location)
        try:
            for offset, length in fragments:
                end = offset + length
                while offset < end:
                    chunk = await self._run(os.pread, fd, min(CHUNK, end - offset), offset)
                    if not chunk:
                        raise SourceError(f"source {self.name}: {location.path} is shorter than indexed")
                    offset += len(chunk)
                    yield to_little_endian(chunk, location.swap) if location.swap else chunk
        finally:
            os.close(fd)

    def _read_small(self, location: Location, fragments: tuple[tuple[int, int], ...]) -> bytes:
        fd = self._open(location)
        try:
            parts = [os.pread(fd, length, offset) for offset, length in fragments]
        finally:
            os.close(fd)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) != sum(length for _, length in fragments):
            raise SourceError(f"source {self.name}: {location.path} is shorter than indexed")
        return to_little_endian(data, location.swap) if location.swap else data

    def _decoded_frame(self, location: Location, index: int) -> bytes:
        import pydicom

        try:
            ds = pydicom.dcmread(self.root / location.path)
            pixels: bytes = ds.PixelData
        except FileNotFoundError:
            raise NotFound(f"instance {location.SOPInstanceUID}: file gone from source {self.name}") from None
        except Exception as exc:  # pydicom's many error types on a file that changed under us
            raise SourceError(f"source {self.name}: cannot decode {location.path}: {exc}") from exc
        length = framemap.frame_length(
            int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1)), int(ds.get("BitsAllocated", 16))
        )
        return pixels[index * length : (index + 1) * length]

    async def aiter_bulk(self, location: Location, tag_path: str) -> AsyncIterator[bytes]:
        yield await self._run(self._bulk_value, location, tag_path)

    def _bulk_value(self, location: Location, tag_path: str) -> bytes:
        try:
            return bulk_value(self.root / location.path, tag_path, location.SOPInstanceUID)
        except FileNotFoundError:
            raise NotFound(f"instance {location.SOPInstanceUID}: file gone from source {self.name}") from None
        except DicomFileError as exc:
            raise SourceError(f"source {self.name}: cannot read {location.path}: {exc.message}") from exc

    async def health(self) -> str:
        return "ok" if await self._run(self.root.is_dir) else f"folder {self.root} is missing"

    async def aclose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
