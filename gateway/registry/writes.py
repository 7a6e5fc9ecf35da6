"""Harvest's writes: instances with their locations, rejected files, removals, in batches inside
the harvest's transaction, each batch set-wise (a statement per table, one per patient).

Plain SQL with bound parameters, written once for SQLite and PostgreSQL; ``conn`` is a
transaction's connection (``Registry.transaction()``), ``dialect`` its database's; ``pending``
gathers what the change feed will say of the transaction (``changes``), None to say nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import orjson

from gateway.registry.arbitration import Verdict, arbitrate, fingerprint
from gateway.registry.changes import Pending
from gateway.registry.database import in_chunks
from gateway.registry.record import InstanceRecord
from gateway.registry.schema import AGGREGATE, INSTANCE_COLUMNS, PATIENT_COLUMNS
from gateway.types import PixelInfo

__all__ = ["Harvested", "put_instances", "put_records", "put_reject", "remove_paths", "upsert"]


class Harvested(NamedTuple):
    """One instance to write: where it is, its change tokens, what was read of it."""

    path: str
    size: int
    mtime_ns: int
    record: InstanceRecord
    pixel: PixelInfo | None = None


def put_instances(
    conn: Any,
    dialect: str,
    source: str,
    items: Sequence[Harvested],
    ranks: Mapping[str, int] | None = None,
    pending: Pending | None = None,
) -> dict[str, str]:
    """Insert or replace instances and their locations (inside a harvest transaction), as
    writing each in turn would, but set-wise: a statement per table for the
    batch and one per patient, not ten per instance. Each is a round trip on PostgreSQL,
    where writing instance by instance managed ~950 instances/s (bench/scale.py).

    ``ranks``: each source's priority (lower wins, see ``arbitration``). Returns the paths whose
    copy conflicts with a higher-priority source's, and why: kept as conflicts, not locations."""
    by_path = {item.path: item for item in items}  # a path given twice: the last one holds
    remove_paths(conn, dialect, source, list(by_path), pending)  # what a replaced path held goes first
    verdict = arbitrate(conn, source, ranks or {}, [item.record for item in by_path.values()])
    _displace(conn, dialect, source, verdict, pending)
    put_records(conn, dialect, verdict.write, source)
    rows = [
        (
            source,
            item.path,
            item.size,
            item.mtime_ns,
            item.record.uids[2],
            pixel.transfer_syntax if pixel else None,
            pixel.mode if pixel else None,
            int(pixel.encapsulated) if pixel else 0,
            orjson.dumps(pixel.frames) if pixel and pixel.frames is not None else None,
            pixel.frame_error if pixel else None,
            pixel.swap_width if pixel else 0,
        )
        for item in by_path.values()
        if item.record.uids[2] in verdict.located
        for pixel in (item.pixel,)
    ]
    conn.executemany(_upsert_sql("locations", _LOCATION_COLUMNS, "source, path"), rows)
    if pending is not None:
        for item in by_path.values():
            if item.record.uids[2] in verdict.located:
                pending.add(source, *item.record.uids)
    refused = {
        item.path: verdict.refused[item.record.uids[2]]
        for item in by_path.values()
        if item.record.uids[2] in verdict.refused
    }
    conn.executemany(
        _upsert_sql("conflicts", _CONFLICT_COLUMNS, "source, path"),
        [
            (source, path, item.size, item.mtime_ns, item.record.uids[2], refused[path])
            for path, item in by_path.items()
            if path in refused
        ],
    )
    return refused


def _displace(conn: Any, dialect: str, source: str, verdict: Verdict, pending: Pending | None) -> None:
    """Other sources' copies that a higher-priority copy contradicts become conflicts."""
    moved: list[tuple[Any, ...]] = []
    for uid, reason in verdict.displaced.items():
        rows = conn.execute(
            "SELECT source, path, size, mtime_ns FROM locations WHERE SOPInstanceUID=? AND source<>?",
            (uid, source),
        ).fetchall()
        moved += [(*row, uid, reason) for row in rows]
    for study, reason in verdict.displaced_studies.items():
        rows = conn.execute(
            "SELECT l.source, l.path, l.size, l.mtime_ns, l.SOPInstanceUID FROM locations l "
            "JOIN instances i ON i.SOPInstanceUID = l.SOPInstanceUID "
            "JOIN series se ON se.SeriesInstanceUID = i.SeriesInstanceUID "
            "WHERE se.StudyInstanceUID=? AND l.source<>?",
            (study, source),
        ).fetchall()
        moved += [(*row, reason) for row in rows]
    by_source: dict[str, list[str]] = {}
    for row in moved:
        by_source.setdefault(row[0], []).append(row[1])
    for other, paths in by_source.items():
        remove_paths(conn, dialect, other, paths, pending)
    for uid in verdict.displaced:  # what stays of the instance is the winner's, about to be written
        conn.execute("UPDATE instances SET held_by = NULL WHERE SOPInstanceUID=?", (uid,))
    conn.executemany(_upsert_sql("conflicts", _CONFLICT_COLUMNS, "source, path"), moved)


def put_records(
    conn: Any, dialect: str, records: Sequence[InstanceRecord], source: str | None = None
) -> None:
    """Upsert the records' patients, studies, series and instances (their metadata now held by
    ``source``); recount what they touch, and what they left: an instance that moved to another
    series or study leaves its old ones recounted, or removed when empty."""
    if not records:
        return
    # Merged in order, so that the batch ends as record-by-record upserts would: a later
    # record's values win, and what it lacks keeps an earlier record's (or the stored) value.
    patients: dict[tuple[str, str], dict[str, Any]] = {}
    studies: dict[str, dict[str, Any]] = {}
    series: dict[str, dict[str, Any]] = {}
    instances: dict[str, dict[str, Any]] = {}
    study_patient: dict[str, tuple[str, str]] = {}
    for record in records:
        key = (record.patient["PatientID"], record.patient["IssuerOfPatientID"])
        patients[key] = record.patient
        study_uid, series_uid, instance_uid = record.uids
        study_patient[study_uid] = key
        studies.setdefault(study_uid, {}).update(record.study)
        series.setdefault(series_uid, {}).update(record.series, StudyInstanceUID=study_uid)
        # Every column: a copy that lacks an attribute must not keep another copy's value of it.
        instances.setdefault(instance_uid, {}).update(
            {name: record.instance.get(name) for name in INSTANCE_COLUMNS},
            SeriesInstanceUID=series_uid,
            metadata=record.metadata,
            held_by=source,
            fingerprint=fingerprint(record),
        )
    left_series, left_studies = _homes(conn, list(instances), list(series))
    ids = _upsert_patients(conn, patients)
    for uid, study in studies.items():
        study["patient"] = ids[study_patient[uid]]
    _upsert_many(conn, "studies", studies.values(), "StudyInstanceUID")
    _upsert_many(conn, "series", series.values(), "SeriesInstanceUID")
    _upsert_many(conn, "instances", instances.values(), "SOPInstanceUID")
    old_series, old_studies = _prune(conn, left_series - set(series), left_studies - set(studies))
    _recount(conn, dialect, list(series) + sorted(old_series), list(studies) + sorted(old_studies))


def _homes(conn: Any, instances: list[str], series: list[str]) -> tuple[set[str], set[str]]:
    """The series and studies these instances and series are in now (before a write moves them)."""
    homes: set[str] = set()
    studies: set[str] = set()
    for chunk in in_chunks(instances):
        marks = ",".join("?" * len(chunk))
        for series_uid, study_uid in conn.execute(
            "SELECT i.SeriesInstanceUID, se.StudyInstanceUID FROM instances i LEFT JOIN series se "
            f"ON se.SeriesInstanceUID = i.SeriesInstanceUID WHERE i.SOPInstanceUID IN ({marks})",
            chunk,
        ).fetchall():
            homes.add(series_uid)
            if study_uid:
                studies.add(study_uid)
    for chunk in in_chunks(series):
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT StudyInstanceUID FROM series WHERE SeriesInstanceUID IN ({marks})", chunk
        ).fetchall()
        studies.update(row[0] for row in rows)
    return homes, studies


def _prune(conn: Any, series: set[str], studies: set[str]) -> tuple[set[str], set[str]]:
    """Remove those of ``series`` left without instances and of ``studies`` left without series
    (and a patient left without studies); returns the series and studies that remain."""
    remaining: set[str] = set()
    for uid in series:
        if conn.execute("SELECT 1 FROM instances WHERE SeriesInstanceUID=?", (uid,)).fetchone():
            remaining.add(uid)
            continue
        study = conn.execute(
            "SELECT StudyInstanceUID FROM series WHERE SeriesInstanceUID=?", (uid,)
        ).fetchone()
        conn.execute("DELETE FROM series WHERE SeriesInstanceUID=?", (uid,))
        if study is not None:
            studies.add(study[0])
    alive: set[str] = set()
    for uid in studies:
        if conn.execute("SELECT 1 FROM series WHERE StudyInstanceUID=?", (uid,)).fetchone():
            alive.add(uid)
            continue
        patient = conn.execute("SELECT patient FROM studies WHERE StudyInstanceUID=?", (uid,)).fetchone()
        conn.execute("DELETE FROM studies WHERE StudyInstanceUID=?", (uid,))
        if (
            patient is not None
            and not conn.execute("SELECT 1 FROM studies WHERE patient=?", (patient[0],)).fetchone()
        ):
            conn.execute("DELETE FROM patient_words WHERE patient=?", (patient[0],))
            conn.execute("DELETE FROM patients WHERE id=?", (patient[0],))
    return remaining, alive


def _recount(conn: Any, dialect: str, series: list[str], studies: list[str]) -> None:
    """Bring the stored counts and ModalitiesInStudy of these series and studies up to date
    (PS3.18 Table 10.6.3-3's computed attributes). Kept as columns, so that QIDO reads them:
    computed per answer, they were most of a 1,000-result page's SQL (bench/scale.py)."""
    for chunk in in_chunks(series):
        conn.execute(
            "UPDATE series SET NumberOfSeriesRelatedInstances = (SELECT COUNT(*) FROM instances y "
            "WHERE y.SeriesInstanceUID = series.SeriesInstanceUID) "
            f"WHERE SeriesInstanceUID IN ({','.join('?' * len(chunk))})",
            chunk,
        )
    aggregate = AGGREGATE[dialect]
    for chunk in in_chunks(studies):
        conn.execute(
            "UPDATE studies SET "
            f"ModalitiesInStudy = (SELECT {aggregate} FROM series x "
            "WHERE x.StudyInstanceUID = studies.StudyInstanceUID), "
            "NumberOfStudyRelatedSeries = (SELECT COUNT(*) FROM series x "
            "WHERE x.StudyInstanceUID = studies.StudyInstanceUID), "
            "NumberOfStudyRelatedInstances = (SELECT COALESCE(SUM(x.NumberOfSeriesRelatedInstances), 0) "
            "FROM series x WHERE x.StudyInstanceUID = studies.StudyInstanceUID) "
            f"WHERE StudyInstanceUID IN ({','.join('?' * len(chunk))})",
            chunk,
        )


def put_reject(
    conn: Any,
    dialect: str,
    source: str,
    path: str,
    size: int,
    mtime_ns: int,
    reason: str,
    pending: Pending | None = None,
) -> None:
    remove_paths(conn, dialect, source, [path], pending)
    reject = {"source": source, "path": path, "size": size, "mtime_ns": mtime_ns, "reason": reason}
    upsert(conn, "rejects", reject, "source, path")


def remove_paths(
    conn: Any, dialect: str, source: str, paths: list[str], pending: Pending | None = None
) -> None:
    """Forget what these paths held (an instance no other location holds, and the series,
    study and patient left empty), then recount the series and studies that remain, once:
    recounted per removed instance, dropping a 10,000-instance series took 2.7 s."""
    held: list[str] = []
    for chunk in in_chunks(paths):
        marks = ",".join("?" * len(chunk))
        conn.execute(f"DELETE FROM rejects WHERE source=? AND path IN ({marks})", (source, *chunk))
        conn.execute(f"DELETE FROM conflicts WHERE source=? AND path IN ({marks})", (source, *chunk))
        held += [
            row[0]
            for row in conn.execute(
                f"SELECT path FROM locations WHERE source=? AND path IN ({marks})", (source, *chunk)
            ).fetchall()
        ]
    series: set[str] = set()
    studies: set[str] = set()
    for path in held:  # a file that changed or went: rare beside the new ones of a harvest
        _forget_path(conn, source, path, series, studies, pending)
    existing, alive = _prune(conn, series, studies)
    _recount(conn, dialect, sorted(existing), sorted(alive))


def _forget_path(
    conn: Any, source: str, path: str, series: set[str], studies: set[str], pending: Pending | None
) -> None:
    """Forget one location and the instance if only it held it; the series and studies it
    touched are added to ``series`` and ``studies`` (the caller prunes and recounts them), the
    instance forgotten to ``pending`` with its patient (the study may go with it)."""
    row = conn.execute(
        "SELECT SOPInstanceUID FROM locations WHERE source=? AND path=?", (source, path)
    ).fetchone()
    if row is None:
        return
    conn.execute("DELETE FROM locations WHERE source=? AND path=?", (source, path))
    uid = row[0]
    if conn.execute("SELECT 1 FROM locations WHERE SOPInstanceUID=?", (uid,)).fetchone():
        # Still held elsewhere. If its metadata was this source's, the remaining copies are read
        # again by their sources' next harvest (their change tokens forgotten), so that what QIDO
        # shows is theirs and not the departed copy's.
        if conn.execute(
            "SELECT 1 FROM instances WHERE SOPInstanceUID=? AND held_by=?", (uid, source)
        ).fetchone():
            conn.execute("UPDATE instances SET held_by = NULL WHERE SOPInstanceUID=?", (uid,))
            conn.execute("UPDATE locations SET mtime_ns = -1 WHERE SOPInstanceUID=?", (uid,))
        return
    found = conn.execute(
        "SELECT i.SeriesInstanceUID, se.StudyInstanceUID, p.INS FROM instances i LEFT JOIN series se "
        "ON se.SeriesInstanceUID = i.SeriesInstanceUID LEFT JOIN studies st "
        "ON st.StudyInstanceUID = se.StudyInstanceUID LEFT JOIN patients p ON p.id = st.patient "
        "WHERE i.SOPInstanceUID=?",
        (uid,),
    ).fetchone()
    conn.execute("DELETE FROM instances WHERE SOPInstanceUID=?", (uid,))
    # The copies that conflicted with this one are read again by their sources' next harvest.
    conn.execute("DELETE FROM conflicts WHERE SOPInstanceUID=?", (uid,))
    if found is not None:
        series.add(found[0])
        if found[1]:
            studies.add(found[1])
            if pending is not None:
                pending.remove(source, found[1], found[0], uid, found[2] or None)


def _upsert_patients(
    conn: Any, patients: dict[tuple[str, str], dict[str, Any]]
) -> dict[tuple[str, str], int]:
    """Insert or update each patient; their ids. The name's word table is rewritten."""
    ids: dict[tuple[str, str], int] = {}
    words: list[tuple[str, int]] = []
    sql = _upsert_sql("patients", PATIENT_COLUMNS, "PatientID, IssuerOfPatientID") + " RETURNING id"
    for key, patient in patients.items():
        row = conn.execute(sql, tuple(patient.get(c) for c in PATIENT_COLUMNS)).fetchone()
        ids[key] = patient_id = int(row[0])
        words += [
            (word, patient_id) for word in sorted(set((patient.get("PatientName_words") or "").split()))
        ]
    for chunk in in_chunks(list(ids.values())):
        conn.execute(f"DELETE FROM patient_words WHERE patient IN ({','.join('?' * len(chunk))})", chunk)
    if words:
        conn.executemany("INSERT INTO patient_words VALUES (?, ?)", words)
    return ids


_LOCATION_COLUMNS = (
    "source", "path", "size", "mtime_ns", "SOPInstanceUID", "TransferSyntaxUID", "mode", "encapsulated",
    "frames", "frame_error", "swap",
)  # fmt: skip
_CONFLICT_COLUMNS = ("source", "path", "size", "mtime_ns", "SOPInstanceUID", "reason")




def _upsert_sql(table: str, names: Sequence[str], key: str) -> str:
    keys = {k.strip() for k in key.split(",")}
    updates = ", ".join(f"{n}=excluded.{n}" for n in names if n not in keys)
    return (
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
        f"ON CONFLICT({key}) DO UPDATE SET {updates}"
    )


def upsert(conn: Any, table: str, values: dict[str, Any], key: str) -> None:
    conn.execute(_upsert_sql(table, list(values), key), tuple(values.values()))


def _upsert_many(conn: Any, table: str, rows: Iterable[dict[str, Any]], key: str) -> None:
    """One ``executemany`` per set of columns: a row updates only the columns it has."""
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for row in rows:
        groups.setdefault(tuple(row), []).append(tuple(row.values()))
    for names, values in groups.items():
        conn.executemany(_upsert_sql(table, names, key), values)
