"""A folder's changes as they happen, from the kernel's file notifications (inotify on Linux)
through watchfiles (the Rust ``notify`` crate; uvicorn's reloader uses the same library).

Each change is a path relative to the folder, as ``FolderSource.scan`` names it, gathered over
a short debounce (a file copied in is one set, not one call per write). What is named is only a
hint: harvest lists those paths again with every check of a full listing (links out of the
folder, odd entries), and the periodic full scan stays the truth, since notifications can be lost
(the kernel's queue overflows) or never come (a network file system changed by another host).

watchfiles' synchronous ``watch`` runs in a worker thread, including the creation of the watcher:
that walks the whole tree adding a watch per directory, which ``awatch`` would do on the event
loop. ``stop`` is checked every ``_STEP_MS``, so a stop ends the thread that soon; a cancelled
watch returns at once and its thread ends as soon.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.to_thread

from gateway.errors import SourceError
from gateway.stream.source import Stop

__all__ = ["watch_folder", "DEBOUNCE_MS"]

DEBOUNCE_MS = 200  # at most this long between a first change and its report
_STEP_MS = 50  # a change is reported once no other came for this long (and stop is checked)
_WAKE_MS = 1000  # how often an idle watcher wakes (its thread ends on stop within _STEP_MS anyway)


async def watch_folder(root: Path, changed: Callable[[set[str]], None], stop: Stop) -> None:
    """Call ``changed`` on the event loop with each set of changed paths under ``root`` (``""``
    for the folder itself, or a path outside it), until ``stop`` is set. Raises ``SourceError``
    when the folder cannot be watched (missing, the kernel's watch limit reached)."""
    import watchfiles  # imported when a folder is watched, not for every use of the sources

    # watchfiles logs every batch of changes at INFO: one line per file copied in, in our log.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    base = os.path.abspath(root)
    halt = threading.Event()  # set when this watch is cancelled: the thread sees it, not the loop

    class Either:
        @staticmethod
        def is_set() -> bool:
            return halt.is_set() or stop.is_set()

    def run() -> None:
        if not os.path.isdir(base):  # watchfiles would wait for it to appear, silently
            raise FileNotFoundError(f"no directory {base}")
        for changes in watchfiles.watch(
            base,
            watch_filter=None,  # harvest decides what is listed (hidden files, odd entries)
            debounce=DEBOUNCE_MS,
            step=_STEP_MS,
            stop_event=Either(),
            rust_timeout=_WAKE_MS,
            force_polling=False,  # polling a large tree is a full scan; the interval does that
            ignore_permission_denied=True,  # an unreadable directory is harvest's to report
            raise_interrupt=False,
        ):
            paths = {_relative(base, path) for _, path in changes}
            if halt.is_set():
                return
            anyio.from_thread.run_sync(changed, paths)

    try:
        await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: watchfiles' internal errors
        raise SourceError(f"folder {root} cannot be watched: {exc}") from exc
    finally:
        halt.set()


def _relative(base: str, path: str) -> str:
    """``path`` relative to the folder; ``""`` (list everything) for the folder itself or for a
    path reported elsewhere, which should not happen but must not go unnoticed."""
    if path.startswith(base + "/"):
        return path[len(base) + 1 :]
    return ""
