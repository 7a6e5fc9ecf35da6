"""Opening a file under a folder without leaving it: what every read of a folder source goes through.

A folder's content is not trusted: anything in it may be a link out of it, a FIFO, a device, or be
swapped for one between two system calls. ``SafeOpener.open`` is the one way a folder source
opens a file, at harvest and to serve:

* The path is resolved one component at a time from the folder, each component opened relative to
  the directory before it with ``O_NOFOLLOW``, so the kernel never follows a link for us; links are
  read and followed by us, only while they stay in the folder (``..`` above it, or an absolute
  target elsewhere, is refused), at most ``MAX_LINKS`` of them (the kernel's own loop bound).
* A non-regular file is never opened (``lstat`` first), and the file is opened ``O_NONBLOCK`` then
  checked with ``fstat``, so a FIFO swapped in between cannot hang a reader.
* On Linux, one ``open`` checked through ``/proc/self/fd`` stands for the walk when no link is on
  the way (the common case, and the per-frame path): the kernel resolves the path, and the
  descriptor is kept only when it really is at the folder's real path joined with the path asked.

What this guarantees: the descriptor returned is on a regular file reached from the folder without
leaving it; a link swapped in at any moment makes the open fail rather than redirect it. Not
covered: a directory moved out of the folder while it is being walked (this needs write access to
the folder's parent file system); a hard link (it is the file, inside by definition).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gateway.errors import DicomFileError

__all__ = ["MAX_LINKS", "SafeOpener", "kind", "not_regular"]

MAX_LINKS = 40  # links followed in one path: the kernel's own limit (MAXSYMLINKS)
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


def kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, for a refusal's reason ("a FIFO")."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def not_regular(mode: int) -> str:
    return f"{kind(mode)}, not a regular file"


class SafeOpener:
    """Opens regular files under ``root`` (the folder as configured) and nowhere else."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._real: str | None = None  # the folder's real path, for the one-open fast path

    def __getstate__(self) -> dict[str, object]:
        # Sent to harvest's worker processes with its source: the real path is looked up there.
        return {"root": self.root, "_real": None}

    def open(self, path: str) -> tuple[int, os.stat_result]:
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
                raise DicomFileError(not_regular(st.st_mode))
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _real_root(self) -> str:
        if self._real is None:
            self._real = os.path.realpath(self.root)
        return self._real

    def _open_direct(self, path: str) -> int | None:
        """One ``open`` when no link is on the way: the kernel resolves the path, then
        ``/proc/self/fd`` says where the descriptor really is; unless that is exactly the folder's
        real path joined with ``path``, the walk decides (None)."""
        full = os.path.join(self._real_root(), path)
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
                    if links > MAX_LINKS:
                        raise DicomFileError(f"more than {MAX_LINKS} symbolic links on the way (a loop)")
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
                        raise DicomFileError(f"a component of the path is {kind(st.st_mode)}")
                    dirs.append(os.open(part, _DIRECTORY, dir_fd=dirs[-1]))
                elif not stat.S_ISREG(st.st_mode):
                    raise DicomFileError(not_regular(st.st_mode))
                else:
                    return os.open(part, _FILE, dir_fd=dirs[-1])
            raise DicomFileError("a symbolic link names a directory, not a regular file")
        finally:
            for fd in dirs:
                os.close(fd)

    def _inside(self, target: str) -> str | None:
        """An absolute link target as a path relative to the folder, or None when it names
        somewhere else. Compared as written: ``..`` in the rest is walked, never above the folder."""
        for base in (self._real_root(), os.path.abspath(self.root)):
            base = base.rstrip("/")
            if target == base:
                return "."
            if target.startswith(base + "/"):
                return target[len(base) + 1 :]
        return None
