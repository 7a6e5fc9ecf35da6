"""The registry: patients, studies, series, instances and their locations, in SQLite.

Kept small on purpose so that a PostgreSQL backend can follow: plain SQL with bound parameters,
one connection per thread, no ORM. Columns are DICOM keywords; ``*_fold`` / ``*_words`` /
``*_norm`` columns are derived forms used for matching (see ``record``).

Writes come from harvest, in batches inside one transaction. Reads come from the HTTP layer.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from pydicom.uid import UID

from gateway.errors import RegistryError
from gateway.registry.attributes import INSTANCE, PATIENT, SERIES, STUDY
from gateway.registry.record import InstanceRecord
from gateway.stream.dicomfile import PixelInfo

log = logging.getLogger("gateway.registry")

__all__ = ["Registry", "Location", "InstanceFile", "FileState", "SourceStats"]

_DERIVED = {
    "PatientName": ("PatientName_fold", "PatientName_words"),
    "ReferringPhysicianName": ("ReferringPhysicianName_fold", "ReferringPhysicianName_words"),
    "StudyTime": ("StudyTime_norm",),
    "SeriesTime": ("SeriesTime_norm",),
    "ContentTime": ("ContentTime_norm",),
    "PerformedProcedureStepStartTime": ("PerformedProcedureStepStartTime_norm",),
}
SCHEMA_VERSION = 3  # bump when a table changes: older registries are rebuilt by harvest
_CACHE_CHECK = 0.5  # seconds a cached location may outlive a harvest that changed it
_LOCATION_CACHE = 1024  # instances (~600 bytes each): memory must not grow with the archive
_INTEGER = {"SeriesNumber", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames"}


def _with_derived(keywords: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for keyword in keywords:
        out.append(keyword)
        out.extend(_DERIVED.get(keyword, ()))
    return tuple(out)


PATIENT_COLUMNS = _with_derived(PATIENT) + ("INS",)
STUDY_COLUMNS = _with_derived(STUDY)
SERIES_COLUMNS = _with_derived(SERIES)
INSTANCE_COLUMNS = _with_derived(INSTANCE)


def _ddl(columns: tuple[str, ...]) -> str:
    return ", ".join(f"{c} {'INTEGER' if c in _INTEGER else 'TEXT'}" for c in columns)


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS patients (
    id INTEGER PRIMARY KEY, {_ddl(PATIENT_COLUMNS)}, UNIQUE (PatientID, IssuerOfPatientID));
CREATE TABLE IF NOT EXISTS studies (
    {_ddl(STUDY_COLUMNS)}, patient INTEGER NOT NULL REFERENCES patients(id),
    PRIMARY KEY (StudyInstanceUID));
CREATE TABLE IF NOT EXISTS series (
    {_ddl(SERIES_COLUMNS)}, StudyInstanceUID TEXT NOT NULL, PRIMARY KEY (SeriesInstanceUID));
CREATE TABLE IF NOT EXISTS instances (
    {_ddl(INSTANCE_COLUMNS)}, SeriesInstanceUID TEXT NOT NULL, metadata BLOB NOT NULL,
    PRIMARY KEY (SOPInstanceUID));
CREATE TABLE IF NOT EXISTS locations (
    source TEXT NOT NULL, path TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
    SOPInstanceUID TEXT NOT NULL, TransferSyntaxUID TEXT, mode TEXT, encapsulated INTEGER,
    frames BLOB, frame_error TEXT, swap INTEGER, PRIMARY KEY (source, path));
CREATE TABLE IF NOT EXISTS rejects (
    source TEXT NOT NULL, path TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, reason TEXT,
    PRIMARY KEY (source, path));
CREATE TABLE IF NOT EXISTS sources (
    name TEXT PRIMARY KEY, started REAL, finished REAL, seen INTEGER, indexed INTEGER,
    skipped INTEGER, failed INTEGER, removed INTEGER, instances INTEGER, since TEXT, last_full REAL);
CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient);
CREATE INDEX IF NOT EXISTS studies_date ON studies (StudyDate);
CREATE INDEX IF NOT EXISTS studies_accession ON studies (AccessionNumber);
CREATE INDEX IF NOT EXISTS patients_id ON patients (PatientID);
CREATE INDEX IF NOT EXISTS patients_ins ON patients (INS);
CREATE INDEX IF NOT EXISTS patients_name ON patients (PatientName_fold);
CREATE INDEX IF NOT EXISTS series_study ON series (StudyInstanceUID);
CREATE INDEX IF NOT EXISTS series_modality ON series (Modality);
CREATE INDEX IF NOT EXISTS instances_series ON instances (SeriesInstanceUID);
CREATE INDEX IF NOT EXISTS locations_instance ON locations (SOPInstanceUID);
"""


@dataclass(frozen=True)
class Location:
    """Where one instance can be read, and how its frames are laid out."""

    source: str
    path: str
    size: int
    SOPInstanceUID: str
    SeriesInstanceUID: str
    StudyInstanceUID: str
    TransferSyntaxUID: str | None
    mode: str | None
    encapsulated: bool
    frames: dict[str, Any] | None
    frame_error: str | None
    swap: int
    SOPClassUID: str | None = None


class InstanceFile(NamedTuple):
    source: str
    path: str
    size: int  # bytes of the stored file; for remote sources, a change token (see ``remote``)
    TransferSyntaxUID: str | None
    SOPInstanceUID: str
    mode: str | None = None
    SOPClassUID: str | None = None

    @property
    def remote(self) -> bool:
        return self.mode == "remote"


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


class Registry:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._generation = 0
        try:
            conn = self._conn()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                _rebuild(conn, self.path, version)
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot create registry schema in {self.path}: {exc}") from exc

    # -- connections ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise RegistryError(f"cannot open registry {self.path}: {exc}") from exc
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
            self._generation += 1  # data_version does not see this connection's own commits
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise RegistryError(f"registry write failed: {exc}") from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise RegistryError(f"registry query failed: {exc}") from exc

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- harvest side -------------------------------------------------------------------------

    def file_states(self, source: str) -> dict[str, FileState]:
        states = {
            row["path"]: FileState(row["size"], row["mtime_ns"], False)
            for row in self.query("SELECT path, size, mtime_ns FROM locations WHERE source=?", (source,))
        }
        for row in self.query("SELECT path, size, mtime_ns FROM rejects WHERE source=?", (source,)):
            states[row["path"]] = FileState(row["size"], row["mtime_ns"], True)
        return states

    def put_instance(
        self,
        conn: sqlite3.Connection,
        source: str,
        path: str,
        size: int,
        mtime_ns: int,
        record: InstanceRecord,
        pixel: PixelInfo | None,
    ) -> None:
        """Insert or replace one instance and its location (inside a harvest transaction)."""
        self._forget_path(conn, source, path)
        self._put_record(conn, record)
        conn.execute(
            "INSERT OR REPLACE INTO locations VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                source,
                path,
                size,
                mtime_ns,
                record.uids[2],
                pixel.transfer_syntax if pixel else None,
                pixel.mode if pixel else None,
                int(pixel.encapsulated) if pixel else 0,
                orjson.dumps(pixel.frames) if pixel and pixel.frames is not None else None,
                pixel.frame_error if pixel else None,
                pixel.swap_width if pixel else 0,
            ),
        )

    def learn(
        self, source: str, path: str, record: InstanceRecord, syntax: str, frames: dict[str, Any]
    ) -> None:
        """What a remote source taught us by sending an instance (its full header, stored syntax and
        frame count), replacing what its search answers said; the location's change tokens stay."""
        with self.transaction() as conn:
            self._put_record(conn, record)
            conn.execute(
                "UPDATE locations SET TransferSyntaxUID = ?, encapsulated = ?, frames = ? "
                "WHERE source = ? AND path = ?",
                (syntax, int(UID(syntax).is_encapsulated), orjson.dumps(frames), source, path),
            )

    def _put_record(self, conn: sqlite3.Connection, record: InstanceRecord) -> None:
        patient_id = self._upsert_patient(conn, record.patient)
        study = dict(record.study, patient=patient_id)
        _upsert(conn, "studies", study, "StudyInstanceUID")
        series = dict(record.series, StudyInstanceUID=record.uids[0])
        _upsert(conn, "series", series, "SeriesInstanceUID")
        instance = dict(record.instance, SeriesInstanceUID=record.uids[1], metadata=record.metadata)
        _upsert(conn, "instances", instance, "SOPInstanceUID")

    def put_reject(
        self, conn: sqlite3.Connection, source: str, path: str, size: int, mtime_ns: int, reason: str
    ) -> None:
        self._forget_path(conn, source, path)
        conn.execute(
            "INSERT OR REPLACE INTO rejects VALUES (?,?,?,?,?)", (source, path, size, mtime_ns, reason)
        )

    def remove_path(self, conn: sqlite3.Connection, source: str, path: str) -> None:
        self._forget_path(conn, source, path)

    def _forget_path(self, conn: sqlite3.Connection, source: str, path: str) -> None:
        conn.execute("DELETE FROM rejects WHERE source=? AND path=?", (source, path))
        row = conn.execute(
            "SELECT SOPInstanceUID FROM locations WHERE source=? AND path=?", (source, path)
        ).fetchone()
        if row is None:
            return
        conn.execute("DELETE FROM locations WHERE source=? AND path=?", (source, path))
        uid = row[0]
        if conn.execute("SELECT 1 FROM locations WHERE SOPInstanceUID=?", (uid,)).fetchone():
            return  # the instance is still held elsewhere
        series = conn.execute(
            "SELECT SeriesInstanceUID FROM instances WHERE SOPInstanceUID=?", (uid,)
        ).fetchone()
        conn.execute("DELETE FROM instances WHERE SOPInstanceUID=?", (uid,))
        if series is None:
            return
        series_uid = series[0]
        if conn.execute("SELECT 1 FROM instances WHERE SeriesInstanceUID=?", (series_uid,)).fetchone():
            return
        study = conn.execute(
            "SELECT StudyInstanceUID FROM series WHERE SeriesInstanceUID=?", (series_uid,)
        ).fetchone()
        conn.execute("DELETE FROM series WHERE SeriesInstanceUID=?", (series_uid,))
        if (
            study is None
            or conn.execute("SELECT 1 FROM series WHERE StudyInstanceUID=?", (study[0],)).fetchone()
        ):
            return
        patient = conn.execute("SELECT patient FROM studies WHERE StudyInstanceUID=?", (study[0],)).fetchone()
        conn.execute("DELETE FROM studies WHERE StudyInstanceUID=?", (study[0],))
        if (
            patient is not None
            and not conn.execute("SELECT 1 FROM studies WHERE patient=?", (patient[0],)).fetchone()
        ):
            conn.execute("DELETE FROM patients WHERE id=?", (patient[0],))

    def _upsert_patient(self, conn: sqlite3.Connection, patient: dict[str, Any]) -> int:
        row = conn.execute(
            "SELECT id FROM patients WHERE PatientID=? AND IssuerOfPatientID=?",
            (patient["PatientID"], patient["IssuerOfPatientID"]),
        ).fetchone()
        values = {c: patient.get(c) for c in PATIENT_COLUMNS}
        if row is None:
            cursor = conn.execute(
                f"INSERT INTO patients ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                tuple(values.values()),
            )
            return int(cursor.lastrowid or 0)
        conn.execute(
            f"UPDATE patients SET {', '.join(f'{c}=?' for c in values)} WHERE id=?",
            (*values.values(), row[0]),
        )
        return int(row[0])

    def record_run(self, stats: SourceStats) -> None:
        with self.transaction() as conn:
            stats.instances = conn.execute(
                "SELECT COUNT(DISTINCT SOPInstanceUID) FROM locations WHERE source=?", (stats.name,)
            ).fetchone()[0]
            conn.execute(
                "INSERT OR REPLACE INTO sources VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    stats.name,
                    stats.started,
                    stats.finished or time.time(),
                    stats.seen,
                    stats.indexed,
                    stats.skipped,
                    stats.failed,
                    stats.removed,
                    stats.instances,
                    stats.since,
                    stats.started if stats.since is None else stats.last_full,
                ),
            )

    def last_run(self, name: str) -> SourceStats | None:
        rows = self.query("SELECT * FROM sources WHERE name = ?", (name,))
        return SourceStats(**dict(rows[0])) if rows else None

    def source_runs(self) -> list[SourceStats]:
        return [SourceStats(**dict(row)) for row in self.query("SELECT * FROM sources ORDER BY name")]

    # -- serving side -------------------------------------------------------------------------

    def locations(self, where: str, params: tuple[Any, ...]) -> list[list[Location]]:
        """Every location of the instances selected by ``where`` (over instances i, series se):
        one list of alternatives per instance, in study order."""
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
                )
            )
        return list(by_instance.values())

    def instance_location(self, study: str, series: str, instance: str) -> list[Location]:
        """The locations of one instance (none if unknown), cached until a harvest commits.

        This is the per-frame lookup: a viewer asks for every frame of a study one request at a
        time, so the SQL join and the frame map decoding are done once per instance, not per frame.
        ``PRAGMA data_version`` changes when another connection (a harvest, in this process or
        another) commits; it is read at most every ``_CACHE_CHECK`` seconds, not per frame.
        """
        cache = self._local.__dict__.setdefault("locations", {})
        now = time.monotonic()
        if now - cache.get("checked", -_CACHE_CHECK) >= _CACHE_CHECK:
            version = (self._conn().execute("PRAGMA data_version").fetchone()[0], self._generation)
            if cache.get("version") != version:
                cache.clear()
                cache["version"] = version
            cache["checked"] = now
        key = (study, series, instance)
        location = cache.get(key)
        if location is None:
            found = self.locations(
                "se.StudyInstanceUID = ? AND i.SeriesInstanceUID = ? AND i.SOPInstanceUID = ?", key
            )
            if not found:
                return []
            if len(cache) > _LOCATION_CACHE:
                version, checked = cache["version"], cache["checked"]
                cache.clear()
                cache.update(version=version, checked=checked)
            location = cache[key] = found[0]  # one instance: its list of alternatives
        return location

    def instance_files(self, where: str, params: tuple[Any, ...]) -> list[list[InstanceFile]]:
        """What a study or series retrieve needs of each instance, without frame maps:
        ~150 bytes an instance, so a 4,000-instance study costs well under a megabyte."""
        rows = self.query(
            _in_study_order(
                "l.source, l.path, l.size, l.TransferSyntaxUID, l.SOPInstanceUID, l.mode, i.SOPClassUID",
                where,
            ),
            params,
        )
        by_instance: dict[str, list[InstanceFile]] = {}
        for source, path, size, syntax, uid, mode, sop_class in rows:
            by_instance.setdefault(uid, []).append(
                InstanceFile(source, path, size, syntax, uid, mode, sop_class)
            )
        return list(by_instance.values())

    def metadata(self, where: str, params: tuple[Any, ...]) -> list[bytes]:
        rows = self.query(_in_study_order("i.metadata", where, with_locations=False), params)
        return [row[0] for row in rows]

    def counts(self) -> dict[str, int]:
        return {
            table: self.query(f"SELECT COUNT(*) FROM {table}")[0][0]
            for table in ("patients", "studies", "series", "instances", "locations", "rejects")
        }


def _in_study_order(columns: str, where: str, with_locations: bool = True) -> str:
    """Instances ``i`` (with their series ``se`` and, by default, locations ``l``) selected by
    ``where``, in the order every retrieval answers them: series, then instance number."""
    join = " JOIN locations l ON l.SOPInstanceUID = i.SOPInstanceUID" if with_locations else ""
    return (
        f"SELECT {columns} FROM instances i JOIN series se ON se.SeriesInstanceUID = i.SeriesInstanceUID"
        f"{join} WHERE {where} ORDER BY se.SeriesNumber, se.SeriesInstanceUID, i.InstanceNumber, "
        f"i.SOPInstanceUID{', l.source' if with_locations else ''}"
    )


def _rebuild(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """The registry is an index of the sources, rebuilt by harvest: a registry written by another
    version of the schema is emptied, not migrated."""
    tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if tables:
        log.warning(
            "registry %s has schema version %d, not %d: emptied; the next harvest refills it",
            path,
            version,
            SCHEMA_VERSION,
        )
    for table in tables:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def _upsert(conn: sqlite3.Connection, table: str, values: dict[str, Any], key: str) -> None:
    names = list(values)
    updates = ", ".join(f"{n}=excluded.{n}" for n in names if n != key)
    conn.execute(
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
        f"ON CONFLICT({key}) DO UPDATE SET {updates}",
        tuple(values.values()),
    )
