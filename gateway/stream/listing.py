"""Listing a folder source's files for harvest: the whole folder, or just the paths a watch reported.

What is in the folder is not trusted while listing it either:

* ``walk`` goes through the folder without recursion (an explicit stack, depth first, by name), at
  most ``MAX_DEPTH`` directory levels deep, and follows no directory link. Only regular files are
  listed as files; what will not be read (a FIFO, a socket, a device, a link out of the folder or
  to a directory, a directory too deep or that cannot be listed, a name that is not UTF-8) is
  handed to harvest as a refused entry (``refused``): counted as failed, logged, remembered until
  it changes. Nothing is opened while listing but the targets of links, through the same
  ``SafeOpener`` that every read uses, so a link is listed only when it could be served.
* ``walk_paths`` lists just the paths a watch reported (``gateway.stream.watch``) with the checks of
  ``walk``: each component on the way is looked at as ``walk`` would list it, so a new file in a
  folder of 100,000 is indexed without walking them all. The full walk stays the truth.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterator

from gateway.errors import DicomFileError, SourceError
from gateway.redact import escape
from gateway.stream.safeopen import SafeOpener, not_regular
from gateway.types import Entry

__all__ = ["MAX_DEPTH", "refused", "walk", "walk_paths"]

# Directory levels walked below the folder. PACS storage layouts are a handful deep
# (patient/study/series/file, or year/month/day/...); 1,100 nested directories are an attack.
MAX_DEPTH = 32


def walk(source: str, opener: SafeOpener, top: str = "", depth: int = 0) -> Iterator[Entry]:
    """Everything below the directory ``top`` ("": the folder), ``depth`` levels down, of the
    folder source named ``source`` (for error messages)."""
    stack: list[tuple[str, int]] = [(top, depth)]  # (directory, depth): depth first, by name
    while stack:
        directory, depth = stack.pop()
        try:
            with os.scandir(os.path.join(opener.root, directory)) as listing:
                found = sorted(listing, key=lambda item: item.name)
        except OSError as exc:
            if not directory:  # the folder itself: nothing can be said of what it holds
                raise SourceError(
                    f"source {source}: folder {opener.root} cannot be listed: {exc.strerror}"
                ) from exc
            yield refused(directory, None, f"directory cannot be listed ({exc.strerror})")
            continue
        below: list[str] = []
        for item in found:
            path = f"{directory}/{item.name}" if directory else item.name
            entry = _entry(opener, item, path, depth, below)
            if entry is not None:
                yield entry
        stack.extend((path, depth + 1) for path in reversed(below))


def walk_paths(source: str, opener: SafeOpener, paths: Collection[str]) -> Iterator[Entry]:
    """What ``walk`` lists at or under each path: each component on the way is looked at as
    ``walk`` would list it, so a path below a link, a file or a directory too deep yields that
    entry (refused) and nothing under it; a directory is walked whole; a path gone, nothing."""
    listed: set[str] = set()  # entries yielded and directories walked: once each
    for path in sorted(paths):
        parts = path.split("/")
        if not path or any(part in ("", ".", "..") for part in parts):
            continue  # not a name ``walk`` could list
        for depth in range(len(parts)):
            sub = "/".join(parts[: depth + 1])
            if sub in listed:
                break
            try:
                st = os.lstat(os.path.join(opener.root, sub))
            except OSError:
                break  # gone (or unreachable): the harvest forgets what it held there
            below: list[str] = []
            entry = _entry(opener, _Named(parts[depth], st), sub, depth, below)
            if entry is not None:
                listed.add(sub)
                yield entry
                break
            if not below:
                break  # a hidden file: never listed
            if depth == len(parts) - 1:
                listed.add(sub)
                yield from walk(source, opener, sub, depth + 1)


def refused(path: str, st: os.stat_result | None, reason: str) -> Entry:
    """An entry harvest counts as failed with ``reason``, stamped with the entry's own size and
    time: harvest reads it again only once it changes."""
    return Entry(path, st.st_size if st else 0, st.st_mtime_ns if st else 0, refused=reason)


def _entry(
    opener: SafeOpener, item: os.DirEntry[str] | _Named, path: str, depth: int, below: list[str]
) -> Entry | None:
    """The entry for one listed name (None for hidden files and directories to walk, which
    go to ``below``)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        # The registry holds paths as text: this name cannot be stored, nor served.
        return refused(escape(path, 4096), None, "file name is not valid UTF-8")
    try:
        st = item.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if depth + 1 > MAX_DEPTH:
                return refused(path, st, f"more than {MAX_DEPTH} directory levels deep: not walked")
            below.append(path)
            return None
        if item.name.startswith("."):
            return None
        if stat.S_ISREG(st.st_mode):
            return Entry(path, st.st_size, st.st_mtime_ns)
        if not stat.S_ISLNK(st.st_mode):
            return refused(path, st, not_regular(st.st_mode))
    except FileNotFoundError:
        return refused(path, None, "vanished while the folder was being listed")
    except OSError as exc:
        return refused(path, None, f"cannot be read ({exc.strerror})")
    # A link: listed by what it leads to, if that is a regular file in the folder.
    try:
        fd, target = opener.open(path)
        os.close(fd)
    except DicomFileError as exc:
        return refused(path, st, exc.message)
    except FileNotFoundError:
        return refused(path, st, "a symbolic link to nothing")
    except OSError as exc:
        return refused(path, st, f"cannot be read ({exc.strerror})")
    return Entry(path, target.st_size, target.st_mtime_ns)


class _Named:
    """A name the watcher reported, with its ``lstat``: what ``_entry`` asks of an ``os.DirEntry``."""

    def __init__(self, name: str, st: os.stat_result) -> None:
        self.name = name
        self._st = st

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        assert not follow_symlinks  # ``_entry`` looks at the name itself, never through a link
        return self._st
