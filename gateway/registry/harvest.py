"""Harvest: bring the registry in line with what a source holds.

Incremental: an entry whose size and modification time are unchanged is skipped; new and changed
entries are read (header only); entries gone from the source are dropped. Unreadable or non-DICOM
files are counted, logged and remembered (so they are not re-read until they change), never fatal.
If the source cannot be listed at all (an unmounted folder, say), nothing is removed.

A harvest of ``paths`` (what a watched source said changed) lists only those paths and what is
below them (``Watcher.scan_paths``), and compares them with what the registry holds at or below
them alone: a new study in a folder of 100,000 files costs its own files, not a walk. What it no
longer finds there is dropped; what the watcher missed waits for the next full harvest, which alone
sees everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Executor

from gateway.errors import DicomFileError, GatewayError
from gateway.redact import escape
from gateway.registry.record import InstanceRecord, build_record, record_from_json
from gateway.registry.store import FileState, Harvested, Registry, SourceStats
from gateway.stream.source import Source
from gateway.types import Entry, PixelInfo

__all__ = ["harvest", "parse_entry"]

log = logging.getLogger("gateway.harvest")
_ANALYZE_AFTER = 1000  # instances indexed or removed in one harvest that refresh the statistics
_BATCH = 64  # entries per parse job: small enough that every worker and the writer overlap

Parsed = tuple[Entry, InstanceRecord | None, PixelInfo | None, str | None]


def parse_entry(source: Source, entry: Entry) -> Parsed:
    """Header and record of one entry, or the reason it cannot be indexed (runs in any worker)."""
    try:
        if entry.prepared is not None:
            body, pixel = entry.prepared
            return entry, record_from_json(body), pixel, None
        ds, pixel = source.read_header(entry)
        return entry, build_record(ds, pixel), pixel, None
    except DicomFileError as exc:
        return entry, None, None, exc.message


FULL_EVERY = 24 * 3600.0  # seconds between full runs of a remote source; incremental runs between
_OVERLAP = 24 * 3600.0  # an incremental run reaches back one day before the last run started


def _window(registry: Registry, source: Source, now: float) -> tuple[str | None, float | None]:
    """(StudyDate lower bound, last full run) for this run. Folders are always read whole (their
    harvest is incremental by file size and time); remote sources are asked for studies since the
    last run, with a full run every ``FULL_EVERY`` to learn about deletions and late arrivals."""
    if source.kind == "filesystem":
        return None, None
    last = registry.last_run(source.name)
    if last is None or last.last_full is None or last.started is None or now - last.last_full > FULL_EVERY:
        return None, None
    return time.strftime("%Y%m%d", time.localtime(last.started - _OVERLAP)), last.last_full


def _parse_batch(source: Source, entries: list[Entry]) -> list[Parsed]:
    return [parse_entry(source, entry) for entry in entries]


_LOOKUP = 500  # paths per lookup of their states (bound parameters of one statement)
_PREFIXES = 50  # directories per lookup of what is below them (each compared with every path)


def _states(
    registry: Registry, source: str, paths: Collection[str], below: bool = False
) -> dict[str, FileState]:
    """What the registry holds of ``source`` at each of ``paths`` (``below``: under each, as
    directories), as ``Registry.file_states`` says it for the whole source."""
    states: dict[str, FileState] = {}
    ordered = sorted(paths)
    step = _PREFIXES if below else _LOOKUP
    for table in ("locations", "rejects", "conflicts"):  # rejects and conflicts: read when changed
        for start in range(0, len(ordered), step):
            chunk = ordered[start : start + step]
            if below:
                # substr, not LIKE or a range, whose meaning depends on the database's collation;
                # it reads every path of the source, once per chunk: directories that went are rare.
                where = " OR ".join(f"substr(path, 1, {len(path) + 1}) = ?" for path in chunk)
                params = [path + "/" for path in chunk]
            else:
                where, params = f"path IN ({','.join('?' * len(chunk))})", chunk
            sql = f"SELECT path, size, mtime_ns FROM {table} WHERE source = ? AND ({where})"
            for row in registry.query(sql, (source, *params)):
                states[row["path"]] = FileState(row["size"], row["mtime_ns"], table != "locations")
    return states


def _changed(
    registry: Registry, source: Source, paths: Collection[str]
) -> tuple[list[Entry], dict[str, FileState]]:
    """What a harvest of ``paths`` lists, and what the registry held there: at each path and
    each entry listed (by the primary key), and below each path that is no longer a file (a
    directory walked, or gone), unless the registry held it as a file or it was a hidden name."""
    assert source.watch is not None
    entries = list(source.watch.scan_paths(paths))  # bounded by what changed
    listed = {entry.path for entry in entries}
    known = _states(registry, source.name, listed | set(paths))
    places = [
        p for p in paths if p not in listed and p not in known and not p.rpartition("/")[2].startswith(".")
    ]
    if places:
        known.update(_states(registry, source.name, places, below=True))
    return entries, known


def harvest(
    registry: Registry,
    source: Source,
    progress: Callable[[SourceStats], None] | None = None,
    executor: Executor | None = None,
    paths: Collection[str] | None = None,
) -> SourceStats:
    """Harvest ``source`` into ``registry``; ``executor`` (a process pool) parses in parallel.
    ``paths``: only these (and what is below them), as the source's watcher named them; the run
    is not recorded as the source's last (``gateway sources`` shows the last full listing)."""
    stats = SourceStats(source.name, started=time.time())
    entries: Iterable[Entry]
    if paths is not None and source.watch is not None:
        entries, known = _changed(registry, source, paths)
    else:
        paths = None
        stats.since, stats.last_full = _window(registry, source, stats.started or 0.0)
        known = registry.file_states(source.name)
        entries = source.scan(stats.since)
    seen: set[str] = set()
    pending: list[Entry] = []
    futures = []

    def store(parsed: list[Parsed]) -> None:
        indexed: list[Harvested] = []
        with registry.transaction() as conn:
            for entry, record, pixel, reason in parsed:
                if record is None:
                    stats.failed += 1
                    log.warning("source %s: %s not indexed: %s", source.name, escape(entry.path), reason)
                    registry.put_reject(
                        conn, source.name, entry.path, entry.size, entry.mtime_ns, reason or "unreadable"
                    )
                else:
                    indexed.append(Harvested(entry.path, entry.size, entry.mtime_ns, record, pixel))
            conflicts = registry.put_instances(conn, source.name, indexed)
        for path, reason in conflicts.items():
            log.warning("source %s: %s conflicts, not served: %s", source.name, escape(path), reason)
        stats.conflicts += len(conflicts)
        stats.indexed += len(indexed) - len(conflicts)
        registry.wrote(len(indexed))
        if progress:
            progress(stats)

    def dispatch(batch: list[Entry]) -> None:
        if executor is None:
            store(_parse_batch(source, batch))
            return
        futures.append(executor.submit(_parse_batch, source, batch))
        while len(futures) > 4 or (futures and futures[0].done()):
            store(futures.pop(0).result())

    try:
        for entry in entries:
            stats.seen += 1
            seen.add(entry.path)
            old = known.get(entry.path)
            if old is not None and old.size == entry.size and old.mtime_ns == entry.mtime_ns:
                stats.skipped += 1
                continue
            pending.append(entry)
            if len(pending) >= _BATCH:
                dispatch(pending)
                pending = []
            elif progress and stats.seen % _BATCH == 0:
                progress(stats)
    except GatewayError as exc:
        for future in futures:
            future.cancel()
        log.error("source %s: harvest stopped, nothing removed: %s", source.name, exc.message)
        raise
    if pending:
        dispatch(pending)
    for future in futures:
        store(future.result())
    # Only a full run tells what is gone: an incremental one saw recent studies alone (a run of
    # paths: ``known`` holds what was at or below them, all of it listed again).
    gone = [path for path in known if path not in seen] if stats.since is None else []
    if gone:
        with registry.transaction() as conn:
            registry.remove_paths(conn, source.name, gone)
        stats.removed = len(gone)
    if stats.indexed + stats.removed >= _ANALYZE_AFTER:
        registry.analyze()  # the query planner's statistics, for what changed in bulk
    stats.finished = finished = time.time()
    scope = f" (studies since {stats.since})" if stats.since else ""
    if paths is not None:
        scope = f" ({len(paths)} paths changed)"
    else:
        registry.record_run(stats)
    if progress:
        progress(stats)
    log.info(
        "source %s%s: seen %d, indexed %d, skipped %d, failed %d, conflicts %d, removed %d in %.1f s",
        source.name,
        scope,
        stats.seen,
        stats.indexed,
        stats.skipped,
        stats.failed,
        stats.conflicts,
        stats.removed,
        finished - (stats.started or finished),
    )
    return stats
