"""The registry: patients, studies, series, instances and their locations, in SQLite (embedded
default) or PostgreSQL (several nodes on one database).

Plain SQL with bound parameters, no ORM, written once for both (``database`` says what differs).
The tables are ``schema``'s. Writes come from harvest, in batches inside one transaction (the SQL
is ``writes``'), and each transaction appends what it did to the change feed as it commits (the
SQL is ``changes``'); reads come from the HTTP layer and the access policy, which name what they
want by UIDs (a retrieval's ``scope``) or by a ``Query`` (a search: ``search``) and never write SQL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydicom.uid import UID

from gateway import dburl
from gateway.errors import RegistryError
from gateway.registry import changes as _changes
from gateway.registry import search as _search
from gateway.registry import writes
from gateway.registry.arbitration import arbitrate
from gateway.registry.database import Database, Row, open_database
from gateway.registry.record import InstanceRecord
from gateway.registry.schema import CANONICAL, FEED_TABLES, MIGRATED, SCHEMA_VERSION, TABLES, schema
from gateway.registry.writes import Harvested
from gateway.types import Change, InstanceFile, Level, Location, PixelInfo, Query, Restriction

log = logging.getLogger("gateway.registry")

__all__ = ["Registry", "FileState", "SourceStats", "Harvested", "Row", "Scope"]

# The UIDs of a retrieval's path, by keyword: StudyInstanceUID, and optionally SeriesInstanceUID
# and SOPInstanceUID under it.
Scope = Mapping[str, str]

_CACHE_CHECK = 0.5  # seconds a cached location may outlive a harvest that changed it
_LOCATION_CACHE = 1024  # instances (~600 bytes each): memory must not grow with the archive
_ESTIMATES_FOR = 60.0  # seconds the statistics' row figures are reused (``estimated_rows``)
_REFRESH_FIRST = 5000  # instances written before the first refresh of the statistics (``wrote``)


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    rejected: bool


@dataclass
class SourceStats:
    name: str
    started: float | None = None
    finished: float | None = None
    seen: int = 0
    indexed: int = 0
    skipped: int = 0
    failed: int = 0
    removed: int = 0
    instances: int = 0
    since: str | None = None  # the StudyDate lower bound of an incremental run; None: a full one
    last_full: float | None = None  # when the last full run started
    conflicts: int = 0  # copies this run found conflicting with a higher-priority source's


class Registry:
    def __init__(self, url: Path | str) -> None:
        """``url``: ``sqlite:///PATH``, ``postgresql://...``, or a path (SQLite)."""
        text = str(url)
        if dburl.check(text) is not None:
            text = f"{dburl.SQLITE}{text}"
        self.url = text
        self.db: Database = open_database(text, CANONICAL)
        self.dialect = self.db.dialect
        self._local = threading.local()
        self._written = 0  # instances written by this process (see ``wrote``)
        self._refresh_at = _REFRESH_FIRST
        self._estimates: tuple[float, dict[str, float]] | None = None
        # Each source's priority (lower wins: gateway.registry.arbitration), set by the gateway
        # from its configuration; a source not named here ranks last.
        self.ranks: dict[str, int] = {}
        try:
            version = self.db.schema_version()
            if version in MIGRATED:
                _migrate(self.db, version)
            elif version != SCHEMA_VERSION:
                _rebuild(self.db, version)
            self.db.create_schema(schema(self.dialect), SCHEMA_VERSION)
        except RegistryError as exc:
            raise RegistryError(f"cannot create registry schema in {self.db.where}: {exc.message}") from exc

    # -- connections ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A write transaction: ``with registry.transaction() as conn: conn.execute(sql, params)``.
        What harvest's writes in it did (``put_instances``, ``remove_paths``, ...) is appended to
        the change feed just before it commits, in the same transaction."""
        with self.db.transaction() as conn:
            pending = self._local.pending = _changes.Pending()
            try:
                yield conn
                _changes.flush(conn, self.dialect, pending)
            finally:
                self._local.pending = None

    def _pending(self) -> _changes.Pending | None:
        """The change feed's notes of this thread's open ``transaction`` (None outside one: a
        connection from ``db.transaction()`` writes without telling the feed)."""
        pending: _changes.Pending | None = getattr(self._local, "pending", None)
        return pending

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        """Rows of any SQL: for the registry's own modules, tests and tools; the layers above ask
        by name (``search``, ``instance_files``, ...)."""
        return self.db.query(sql, params)

    def close(self) -> None:
        self.db.close()

    # -- harvest side -------------------------------------------------------------------------

    def harvesting(self, source: str) -> Any:
        """A context manager yielding True when this process may harvest ``source`` now: one
        harvest per source at a time, whatever the number of nodes on the registry."""
        return self.db.exclusive(f"harvest:{source}")

    def file_states(self, source: str) -> dict[str, FileState]:
        states = {
            row["path"]: FileState(row["size"], row["mtime_ns"], False)
            for row in self.query("SELECT path, size, mtime_ns FROM locations WHERE source=?", (source,))
        }
        for table in ("rejects", "conflicts"):  # read again when they change
            for row in self.query(f"SELECT path, size, mtime_ns FROM {table} WHERE source=?", (source,)):
                states[row["path"]] = FileState(row["size"], row["mtime_ns"], True)
        return states

    def conflicts(self, source: str | None = None) -> list[Row]:
        """Copies of instances that conflict with a higher-priority source's (never served)."""
        if source is None:
            return self.query("SELECT * FROM conflicts ORDER BY source, path")
        return self.query("SELECT * FROM conflicts WHERE source=? ORDER BY path", (source,))

    def put_instance(
        self,
        conn: Any,
        source: str,
        path: str,
        size: int,
        mtime_ns: int,
        record: InstanceRecord,
        pixel: PixelInfo | None,
    ) -> None:
        """Insert or replace one instance and its location (inside a harvest transaction)."""
        self.put_instances(conn, source, [Harvested(path, size, mtime_ns, record, pixel)])

    def put_instances(self, conn: Any, source: str, items: Sequence[Harvested]) -> dict[str, str]:
        """Insert or replace instances and their locations (inside a harvest transaction), as
        ``put_instance`` for each in turn would, but set-wise (see ``writes``); returns the paths
        whose copy conflicts with a higher-priority source's, and why (``arbitration``)."""
        return writes.put_instances(conn, self.dialect, source, items, self.ranks, self._pending())

    def learn(
        self, source: str, path: str, record: InstanceRecord, syntax: str, frames: dict[str, Any]
    ) -> str | None:
        """What a remote source taught us by sending an instance (its full header, stored syntax and
        frame count), replacing what its search answers said; the location's change tokens stay.
        Returns why nothing was learnt when the header conflicts with a higher-priority source's
        (or moves its study to another patient): see ``arbitration``; or when the location is no
        longer indexed (a harvest removed it meanwhile: an instance without a location would be
        listed and never served).

        The change feed hears of it only when what a study or series search shows changed (the
        PACS's C-FIND said another PatientID, name or description than its header, ...): then it
        is the ``instances.added`` a harvest reading that header would append (and the study is
        announced as updated once quiet). A learn that changes nothing shown, what happens each
        time a viewer first opens a DIMSE study, appends nothing: subscribers are not told twice
        of the same study."""
        study, series, instance = record.uids
        with self.transaction() as conn:
            verdict = arbitrate(conn, source, self.ranks, [record])
            if instance in verdict.refused:
                return verdict.refused[instance]
            if not conn.execute(
                "SELECT 1 FROM locations WHERE source = ? AND path = ?", (source, path)
            ).fetchone():
                return f"{path} is no longer indexed for source {source}"
            before = _changes.indexed_state(conn, study, series)
            writes.put_records(conn, self.dialect, verdict.write, source)
            conn.execute(
                "UPDATE locations SET TransferSyntaxUID = ?, encapsulated = ?, frames = ? "
                "WHERE source = ? AND path = ?",
                (syntax, int(UID(syntax).is_encapsulated), orjson.dumps(frames), source, path),
            )
            pending = self._pending()
            if pending is not None and _changes.indexed_state(conn, study, series) != before:
                pending.add(source, study, series, instance)
        return None

    def put_reject(self, conn: Any, source: str, path: str, size: int, mtime_ns: int, reason: str) -> None:
        writes.put_reject(conn, self.dialect, source, path, size, mtime_ns, reason, self._pending())

    def remove_paths(self, conn: Any, source: str, paths: list[str]) -> None:
        writes.remove_paths(conn, self.dialect, source, paths, self._pending())

    def analyze(self, vacuum: bool = True) -> None:
        """Refresh the database's statistics (after a harvest that changed many instances)."""
        self.db.analyze([t for t in TABLES + FEED_TABLES if t != "registry_meta"], vacuum)

    def estimated_rows(self, tables: Sequence[str]) -> dict[str, float]:
        """Rows per table by the database's statistics (which only ``analyze`` moves),
        remembered for a minute: read per name query, they were a round trip each time."""
        now = time.monotonic()
        cached = self._estimates
        if cached is None or now - cached[0] > _ESTIMATES_FOR or not set(tables) <= cached[1].keys():
            cached = self._estimates = (now, self.db.estimated_rows(tuple(tables)))
        return cached[1]

    def wrote(self, count: int) -> None:
        """Count instances just written (after their transaction); refresh the statistics each
        time this process has written as many again as at the last refresh. A first harvest
        into an empty registry otherwise runs on the plans of an empty one: without statistics
        (PostgreSQL's autovacuum off, or behind) PostgreSQL looked a batch's paths up by
        reading every location, and indexing slowed from 4,850 to ~1,200 instances/s by
        1,000,000. Doubling keeps the refreshes to a few dozen over any harvest."""
        self._written += count
        if self._written >= self._refresh_at:
            self.analyze(vacuum=False)
            self._refresh_at = 2 * self._written

    def record_run(self, stats: SourceStats) -> None:
        with self.transaction() as conn:
            stats.instances = conn.execute(
                "SELECT COUNT(DISTINCT SOPInstanceUID) FROM locations WHERE source=?", (stats.name,)
            ).fetchone()[0]
            run = {
                "name": stats.name,
                "started": stats.started,
                "finished": stats.finished or time.time(),
                "seen": stats.seen,
                "indexed": stats.indexed,
                "skipped": stats.skipped,
                "failed": stats.failed,
                "removed": stats.removed,
                "instances": stats.instances,
                "since": stats.since,
                "last_full": stats.started if stats.since is None else stats.last_full,
            }
            writes.upsert(conn, "sources", run, "name")

    def last_run(self, name: str) -> SourceStats | None:
        rows = self.query("SELECT * FROM sources WHERE name = ?", (name,))
        return SourceStats(**dict(rows[0])) if rows else None

    def source_runs(self) -> list[SourceStats]:
        return [SourceStats(**dict(row)) for row in self.query("SELECT * FROM sources ORDER BY name")]

    # -- the change feed (the SQL is ``changes``') ----------------------------------------------

    def changes(self, since: int, limit: int, restriction: Restriction | None = None) -> list[Change]:
        """The feed's events after ``since`` in ``seq`` order, at most ``limit``, those that
        ``restriction`` lets through (None: all). Pass the last ``seq`` seen as the next ``since``:
        numbers may be skipped, never reordered (see ``changes``). With ``since`` below
        ``changes_horizon()`` (read after this), pruned events are missing from the answer."""
        return _changes.read(self.query, self.dialect, since, limit, restriction)

    def last_change(self) -> int:
        """The greatest ``seq`` of the feed (0 when it is empty)."""
        return _changes.last(self.query)

    def changes_horizon(self) -> int:
        """The greatest ``seq`` retention pruned (0: none). A reader whose ``since`` is below it
        may have missed events (see ``changes``)."""
        return _changes.horizon(self.query)

    def prune_changes(
        self, older_than: float, through: int | None = None, batch: int = _changes.PRUNE_BATCH
    ) -> int:
        """The feed's retention: delete the events older than ``older_than`` (a time), and when
        ``through`` is given none after that ``seq`` (the lowest cursor of the active
        subscriptions: what every one of them has fanned out), oldest first, ``batch`` per
        transaction; returns how many went. On SQLite, whose one write lock each batch holds
        (~90 ms for 2,000 events at 1,000,000: bench/changes.py --prune), it waits as long
        between two batches, so that a harvest waiting to write gets its turn; PostgreSQL locks
        rows only. Safe on several nodes at once."""
        total = 0
        # PostgreSQL: without moving the generation that every node's location cache watches
        # (``instance_location``): no location changes here.
        while True:
            started = time.monotonic()
            with self.db.transaction_without_generation() as conn:
                deleted = _changes.prune(conn, self.dialect, older_than, through, batch)
            total += deleted
            if deleted < batch:
                return total
            if self.dialect == "sqlite":
                time.sleep(time.monotonic() - started)

    def announce(self, quiet_seconds: float, now: float) -> list[Change]:
        """Announce the studies with no change for ``quiet_seconds`` at ``now`` (available,
        updated, removed): once per quiet period, safe with several nodes; returns what it
        appended. Idle, it is one index probe."""
        if not self.db.query(*_changes.due_query(quiet_seconds, now)):
            return []
        with self.db.transaction() as conn:
            return _changes.announce(conn, self.dialect, quiet_seconds, now)

    # -- searching (QIDO-RS: the SQL is ``search``'s and ``qido``'s) ---------------------------

    def search(self, query: Query) -> tuple[list[Row], bool]:
        """The rows of the page ``query`` asks for (at most ``qido.MAX_RESULTS``), with the
        columns of its level and the levels above, and whether more rows matched past the page."""
        return _search.search(self, query)

    def holds(self, scope: Scope) -> bool:
        """Whether the study (and series of that study) that ``scope`` names is indexed."""
        return _search.holds(self, scope)

    def first_instances(self, level: Level, uids: Sequence[str]) -> dict[str, bytes]:
        """The stored DICOM JSON of each study's, series' or instance's first instance (in
        retrieval order), by its UID; a UID without one is left out."""
        return _search.first_instances(self, level, uids)

    # -- serving side -------------------------------------------------------------------------

    def locations(self, scope: Scope) -> list[list[Location]]:
        """Every location of the instances under ``scope``: one list of alternatives per
        instance, in study order."""
        where, params = _selected(scope)
        rows = self.query(
            _in_study_order("l.*, i.SeriesInstanceUID, i.SOPClassUID, se.StudyInstanceUID", where), params
        )
        by_instance: dict[str, list[Location]] = {}
        for row in rows:
            by_instance.setdefault(row["SOPInstanceUID"], []).append(
                Location(
                    source=row["source"],
                    path=row["path"],
                    size=row["size"],
                    SOPInstanceUID=row["SOPInstanceUID"],
                    SeriesInstanceUID=row["SeriesInstanceUID"],
                    StudyInstanceUID=row["StudyInstanceUID"],
                    TransferSyntaxUID=row["TransferSyntaxUID"],
                    mode=row["mode"],
                    encapsulated=bool(row["encapsulated"]),
                    frames=orjson.loads(row["frames"]) if row["frames"] is not None else None,
                    frame_error=row["frame_error"],
                    swap=row["swap"] or 0,
                    SOPClassUID=row["SOPClassUID"],
                    mtime_ns=row["mtime_ns"],
                )
            )
        return list(by_instance.values())

    def instance_location(self, study: str, series: str, instance: str) -> list[Location]:
        """The locations of one instance (none if unknown), cached until a harvest commits.

        This is the per-frame lookup: a viewer asks for every frame of a study one request at a
        time, so the SQL join and the frame map decoding are done once per instance, not per frame.
        The database's change token moves when any connection (a harvest, in this process, another
        process or another node) commits; it is read at most every ``_CACHE_CHECK`` seconds, not
        per frame.
        """
        cache = self._local.__dict__.setdefault("locations", {})
        now = time.monotonic()
        if now - cache.get("checked", -_CACHE_CHECK) >= _CACHE_CHECK:
            version = self.db.change_token()
            if cache.get("version") != version:
                cache.clear()
                cache["version"] = version
            cache["checked"] = now
        key = (study, series, instance)
        location = cache.get(key)
        if location is None:
            found = self.locations(
                {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
            )
            if not found:
                return []
            if len(cache) > _LOCATION_CACHE:
                version, checked = cache["version"], cache["checked"]
                cache.clear()
                cache.update(version=version, checked=checked)
            location = cache[key] = found[0]  # one instance: its list of alternatives
        return location

    def instance_files(self, scope: Scope) -> list[list[InstanceFile]]:
        """What a study or series retrieve needs of each instance under ``scope``, without frame
        maps: ~150 bytes an instance, so a 4,000-instance study costs well under a megabyte."""
        where, params = _selected(scope)
        rows = self.query(
            _in_study_order(
                "l.source, l.path, l.size, l.TransferSyntaxUID, l.SOPInstanceUID, l.mode, i.SOPClassUID, "
                "l.mtime_ns",
                where,
            ),
            params,
        )
        by_instance: dict[str, list[InstanceFile]] = {}
        for source, path, size, syntax, uid, mode, sop_class, mtime_ns in rows:
            by_instance.setdefault(uid, []).append(
                InstanceFile(source, path, size, syntax, uid, mode, sop_class, mtime_ns)
            )
        return list(by_instance.values())

    def study_patient(self, study: str) -> tuple[bool, str | None]:
        """Whether ``study`` is indexed, and its patient's INS (None when the files carry none)."""
        rows = self.query(
            "SELECT p.INS FROM studies st JOIN patients p ON p.id = st.patient WHERE st.StudyInstanceUID = ?",
            (study,),
        )
        return (True, rows[0][0] or None) if rows else (False, None)

    def metadata(self, scope: Scope) -> list[bytes]:
        """The stored DICOM JSON of each instance under ``scope``, in study order."""
        where, params = _selected(scope)
        rows = self.query(_in_study_order("i.metadata", where, with_locations=False), params)
        return [row[0] for row in rows]

    def counts(self) -> dict[str, int]:
        return {
            table: self.query(f"SELECT COUNT(*) FROM {table}")[0][0]
            for table in ("patients", "studies", "series", "instances", "locations", "rejects")
        }


_SCOPE_COLUMNS = (  # a scope's UIDs, over instances i and series se
    ("StudyInstanceUID", "se.StudyInstanceUID"),
    ("SeriesInstanceUID", "i.SeriesInstanceUID"),
    ("SOPInstanceUID", "i.SOPInstanceUID"),
)


def _selected(scope: Scope) -> tuple[str, tuple[Any, ...]]:
    """SQL over instances ``i`` and series ``se`` selecting the instances under ``scope``, with
    its parameters."""
    if "StudyInstanceUID" not in scope or not scope.keys() <= {k for k, _ in _SCOPE_COLUMNS}:
        raise ValueError(f"a scope names a study, and a series and an instance in it: {sorted(scope)}")
    selected = [(column, scope[keyword]) for keyword, column in _SCOPE_COLUMNS if keyword in scope]
    return " AND ".join(f"{column} = ?" for column, _ in selected), tuple(uid for _, uid in selected)


def _in_study_order(columns: str, where: str, with_locations: bool = True) -> str:
    """Instances ``i`` (with their series ``se`` and, by default, locations ``l``) selected by
    ``where``, in the order every retrieval answers them: series, then instance number."""
    join = " JOIN locations l ON l.SOPInstanceUID = i.SOPInstanceUID" if with_locations else ""
    return (
        f"SELECT {columns} FROM instances i JOIN series se ON se.SeriesInstanceUID = i.SeriesInstanceUID"
        f"{join} WHERE {where} ORDER BY se.SeriesNumber, se.SeriesInstanceUID, i.InstanceNumber, "
        f"i.SOPInstanceUID{', l.source' if with_locations else ''}"
    )


def _migrate(db: Database, version: int) -> None:
    """Bring a registry of a version in ``MIGRATED`` forward, its data kept: the tables it lacks
    are created (``create_schema`` then records the version). 6 -> 7: the change feed's tables,
    with the studies already indexed counted as announced; 7 -> 8: the feed's ``feed_meta``
    (its retention horizon, 0 until a first pruning). Idempotent: a migration interrupted
    before the version is recorded runs again whole."""
    with db.transaction() as conn:
        if db.dialect == "postgresql":  # one node at a time, as ``create_schema``
            conn.execute("SELECT pg_advisory_xact_lock(7267)")
        for statement in schema(db.dialect):
            conn.execute(statement)
        if version == 6:
            _changes.backfill_activity(conn, time.time())
    log.info(
        "registry %s: schema version %d brought forward to %d in place", db.where, version, SCHEMA_VERSION
    )


def _rebuild(db: Database, version: int) -> None:
    """The registry is an index of the sources, rebuilt by harvest: a registry written by another
    version of the schema is emptied, not migrated."""
    dropped = db.drop(TABLES)
    if dropped:
        log.warning(
            "registry %s has schema version %d, not %d: emptied; the next harvest refills it",
            db.where,
            version,
            SCHEMA_VERSION,
        )
