"""A folder of DICOM files as a source (for example a read-only mount of a PACS's storage).

Frames are read at the offsets recorded at harvest, with ``os.pread`` in a worker thread: no
parsing on the request path. Deflated files are the exception (``mode == "decode"``): their frames
need the dataset inflated, which pydicom does for that one instance.

What is in the folder is not trusted after indexing, nor while listing it:

* Listing (``scan``) walks the folder without recursion, at most ``MAX_DEPTH`` directory levels
  deep, and follows no directory link. Only regular files are listed as files; what will not be
  read (a FIFO, a socket, a device, a link out of the folder or to a directory, a directory too
  deep or that cannot be listed, a name that is not UTF-8) is handed to harvest as a refused entry:
  counted as failed, logged, remembered until it changes. Nothing is opened while listing but the
  targets of links, through the same walk as below.
* Every open, at harvest and to serve, goes through ``_open_file``: the path is resolved one
  component at a time from the folder, each component opened relative to the directory before it
  with ``O_NOFOLLOW``, so the kernel never follows a link for us; links are read and followed by us,
  only while they stay in the folder. A non-regular file is never opened (``lstat`` first), and the
  file is opened ``O_NONBLOCK`` then checked with ``fstat``, so a FIFO swapped in between cannot
  hang a reader. On Linux, one ``open`` checked through ``/proc/self/fd`` stands for the walk when
  no link is on the way (the common case, and the per-frame path).
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
import stat
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
from gateway.stream.source import CHUNK, BatchRetrieval, Frame, Stop, Watcher
from gateway.stream.watch import watch_folder
from gateway.types import Entry, InstanceFile, Location, PixelInfo

__all__ = ["FolderSource", "MAX_DEPTH"]

T = TypeVar("T")
_READERS = 16  # concurrent reads per folder: enough to keep a disk queue busy

# Directory levels walked below the folder. PACS storage layouts are a handful deep
# (patient/study/series/file, or year/month/day/...); 1,100 nested directories are an attack.
MAX_DEPTH = 32
_MAX_LINKS = 40  # links followed in one path: the kernel's own limit (MAXSYMLINKS)
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_PROC_FD = "/proc/self/fd/"
_HAVE_PROC = os.path.isdir(_PROC_FD)

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _not_regular(mode: int) -> str:
    return f"{_kind(mode)}, not a regular file"


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
        self._real: str | None = None  # the folder's real path, for the one-open fast path
        self._executor: ThreadPoolExecutor | None = None  # made on first read; never pickled

    def __getstate__(self) -> dict[str, object]:
        # Harvest sends the source to worker processes; the reader threads stay here.
        state = {"name": self.name, "root": self.root, "changed": None, "_real": None, "_executor": None}
        return {**state, "watch": None}  # and the watch: harvest lists the paths here

    def _run(self, function: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Blocking file work on this source's reader threads (the event loop's plain executor
        costs a third of anyio's ``to_thread`` per call, which matters once per frame)."""
        return asyncio.get_running_loop().run_in_executor(self._readers(), function, *args)

    def _readers(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(_READERS, thread_name_prefix=f"read-{self.name}")
        return self._executor

    # -- opening a file of the folder ---------------------------------------------------------

    def _open_file(self, path: str) -> tuple[int, os.stat_result]:
        """A descriptor on the regular file at ``path`` (relative, '/'-separated) in the folder, and
        its ``fstat``. Raises DicomFileError (refused, saying why), FileNotFoundError, OSError."""
        parts = path.split("/")
        if not path or any(part in ("", ".", "..") for part in parts):
            raise DicomFileError("not a path inside the folder")
        fd = self._open_direct(path) if _HAVE_PROC else None
        if fd is None:
            fd = self._open_walk(parts)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped in between the lstat and the open
                raise DicomFileError(_not_regular(st.st_mode))
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _open_direct(self, path: str) -> int | None:
        """One ``open`` when no link is on the way: the kernel resolves the path, then
        ``/proc/self/fd`` says where the descriptor really is; unless that is exactly the folder's
        real path joined with ``path``, the walk decides (None)."""
        if self._real is None:
            self._real = os.path.realpath(self.root)
        full = os.path.join(self._real, path)
        try:
            if not stat.S_ISREG(os.lstat(full).st_mode):
                return None  # a link, or not a file: the walk follows it or says what it is
        except OSError:
            return None  # gone, or a component is not what it was: the walk says which
        try:
            fd = os.open(full, _FILE)
        except OSError:
            return None  # the last component became a link (ELOOP), or vanished: the walk tells
        try:
            where = os.readlink(_PROC_FD + str(fd))
        except OSError:
            where = None
        if where != full:  # a link on the way, or the folder itself moved: not ours to serve so
            os.close(fd)
            return None
        return fd

    def _open_walk(self, parts: list[str]) -> int:
        """Resolve ``parts`` one component at a time, each opened relative to the directory before
        it and never through a link: links are read and their targets walked the same way, and
        refused when they leave the folder (``..`` above it, or an absolute target elsewhere)."""
        pending = list(reversed(parts))
        # The folder as configured: links in its own path are the configuration's to choose.
        dirs = [os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        links = 0
        try:
            while pending:
                part = pending.pop()
                if part in ("", "."):
                    continue
                if part == "..":
                    if len(dirs) == 1:
                        raise DicomFileError("a symbolic link leads out of the folder")
                    os.close(dirs.pop())
                    continue
                st = os.stat(part, dir_fd=dirs[-1], follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > _MAX_LINKS:
                        raise DicomFileError(f"more than {_MAX_LINKS} symbolic links on the way (a loop)")
                    target = os.readlink(part, dir_fd=dirs[-1])
                    if target.startswith("/"):
                        inside = self._inside(target)
                        if inside is None:
                            raise DicomFileError("a symbolic link leads out of the folder")
                        while len(dirs) > 1:
                            os.close(dirs.pop())
                        target = inside
                    pending.extend(reversed(target.split("/")))
                elif pending:
                    if not stat.S_ISDIR(st.st_mode):
                        raise DicomFileError(f"a component of the path is {_kind(st.st_mode)}")
                    dirs.append(os.open(part, _DIRECTORY, dir_fd=dirs[-1]))
                elif not stat.S_ISREG(st.st_mode):
                    raise DicomFileError(_not_regular(st.st_mode))
                else:
                    return os.open(part, _FILE, dir_fd=dirs[-1])
            raise DicomFileError("a symbolic link names a directory, not a regular file")
        finally:
            for fd in dirs:
                os.close(fd)

    def _inside(self, target: str) -> str | None:
        """An absolute link target as a path relative to the folder, or None when it names
        somewhere else. Compared as written: ``..`` in the rest is walked, never above the folder."""
        if self._real is None:
            self._real = os.path.realpath(self.root)
        for base in (self._real, os.path.abspath(self.root)):
            base = base.rstrip("/")
            if target == base:
                return "."
            if target.startswith(base + "/"):
                return target[len(base) + 1 :]
        return None

    # -- harvest ------------------------------------------------------------------------------

    def scan(self, since: str | None = None) -> Iterator[Entry]:  # a folder is always listed whole
        if not self.root.is_dir():
            raise SourceError(f"source {self.name}: folder {self.root} does not exist")
        return self._walk("", 0)

    def _walk(self, top: str, depth: int) -> Iterator[Entry]:
        """Everything below the directory ``top`` ("": the folder), ``depth`` levels down."""
        stack: list[tuple[str, int]] = [(top, depth)]  # (directory, depth): depth first, by name
        while stack:
            directory, depth = stack.pop()
            try:
                with os.scandir(os.path.join(self.root, directory)) as listing:
                    found = sorted(listing, key=lambda item: item.name)
            except OSError as exc:
                if not directory:  # the folder itself: nothing can be said of what it holds
                    raise SourceError(
                        f"source {self.name}: folder {self.root} cannot be listed: {exc.strerror}"
                    ) from exc
                yield self._refused(directory, None, f"directory cannot be listed ({exc.strerror})")
                continue
            below: list[str] = []
            for item in found:
                path = f"{directory}/{item.name}" if directory else item.name
                entry = self._entry(item, path, depth, below)
                if entry is not None:
                    yield entry
            stack.extend((path, depth + 1) for path in reversed(below))

    def _entry(
        self, item: os.DirEntry[str] | _Named, path: str, depth: int, below: list[str]
    ) -> Entry | None:
        """The entry for one listed name (None for hidden files and directories to walk, which
        go to ``below``)."""
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            # The registry holds paths as text: this name cannot be stored, nor served.
            return self._refused(escape(path, 4096), None, "file name is not valid UTF-8")
        try:
            st = item.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 > MAX_DEPTH:
                    return self._refused(path, st, f"more than {MAX_DEPTH} directory levels deep: not walked")
                below.append(path)
                return None
            if item.name.startswith("."):
                return None
            if stat.S_ISREG(st.st_mode):
                return Entry(path, st.st_size, st.st_mtime_ns)
            if not stat.S_ISLNK(st.st_mode):
                return self._refused(path, st, _not_regular(st.st_mode))
        except FileNotFoundError:
            return self._refused(path, None, "vanished while the folder was being listed")
        except OSError as exc:
            return self._refused(path, None, f"cannot be read ({exc.strerror})")
        # A link: listed by what it leads to, if that is a regular file in the folder.
        try:
            fd, target = self._open_file(path)
            os.close(fd)
        except DicomFileError as exc:
            return self._refused(path, st, exc.message)
        except FileNotFoundError:
            return self._refused(path, st, "a symbolic link to nothing")
        except OSError as exc:
            return self._refused(path, st, f"cannot be read ({exc.strerror})")
        return Entry(path, target.st_size, target.st_mtime_ns)

    # -- watching -----------------------------------------------------------------------------

    async def watch_changes(self, changed: Callable[[set[str]], None], stop: Stop) -> None:
        await watch_folder(self.root, changed, stop)

    def scan_paths(self, paths: Collection[str]) -> Iterator[Entry]:
        """What ``scan`` lists at or under each path: each component on the way is looked at as
        ``scan`` would list it, so a path below a link, a file or a directory too deep yields that
        entry (refused) and nothing under it; a directory is walked whole; a path gone, nothing."""
        if not self.root.is_dir():
            raise SourceError(f"source {self.name}: folder {self.root} does not exist")
        listed: set[str] = set()  # entries yielded and directories walked: once each
        for path in sorted(paths):
            parts = path.split("/")
            if not path or any(part in ("", ".", "..") for part in parts):
                continue  # not a name ``scan`` could list
            for depth in range(len(parts)):
                sub = "/".join(parts[: depth + 1])
                if sub in listed:
                    break
                try:
                    st = os.lstat(os.path.join(self.root, sub))
                except OSError:
                    break  # gone (or unreachable): the harvest forgets what it held there
                below: list[str] = []
                entry = self._entry(_Named(parts[depth], st), sub, depth, below)
                if entry is not None:
                    listed.add(sub)
                    yield entry
                    break
                if not below:
                    break  # a hidden file: never listed
                if depth == len(parts) - 1:
                    listed.add(sub)
                    yield from self._walk(sub, depth + 1)

    @staticmethod
    def _refused(path: str, st: os.stat_result | None, reason: str) -> Entry:
        # The stamp of the entry itself: harvest reads it again only once it changes.
        return Entry(path, st.st_size if st else 0, st.st_mtime_ns if st else 0, refused=reason)

    def read_header(self, entry: Entry) -> tuple[Dataset, PixelInfo | None]:
        if entry.refused is not None:
            raise DicomFileError(entry.refused)
        try:
            fd, st = self._open_file(entry.path)
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
            fd, st = self._open_file(location.path)
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


class _Named:
    """A name the watcher reported, with its ``lstat``: what ``_entry`` asks of an ``os.DirEntry``."""

    def __init__(self, name: str, st: os.stat_result) -> None:
        self.name = name
        self._st = st

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        assert not follow_symlinks  # ``_entry`` looks at the name itself, never through a link
        return self._st
