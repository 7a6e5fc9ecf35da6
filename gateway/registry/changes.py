"""The change feed: durable, ordered events of what harvest wrote and removed, and the study
announcements made from them once a study is quiet.

Two tables (``schema``): ``changes``, the feed itself, one row per event with a sequence number
``seq``; and ``study_activity``, one row per study touched: when it last changed, whether it has been
announced, whether changes wait for an announcement.

What is appended, and when:

- ``instances.added`` / ``instances.removed``: in the transaction of the harvest write or removal
  itself (``Registry.transaction`` gathers them in a :class:`Pending` and ``flush`` appends them
  just before the commit), one event per (source, series) per transaction, with the number of
  instances. Added counts the copies the source wrote (new, or changed and read again); removed
  the instances the index forgot (an instance another source still holds is not removed). A file
  read again in the same transaction is added, not removed and added.
- ``study.available`` / ``study.updated`` / ``study.removed``: by ``announce``, for each study with
  no change for the quiet period: the first announcement of a study that exists, a later one, or
  its last instance gone (after which the study is forgotten: if it comes back, it is available
  again). One per quiet period, however many batches the study arrived in.

Ordering, for readers (the API, the subscription worker): ``seq`` only grows, in commit order.
On SQLite every write transaction is serialised by the database. On PostgreSQL, where several
nodes write at once and sequence values are handed out before commit, every transaction that
appends takes one advisory transaction lock (``_ORDER_LOCK``) just before taking its sequence
values and holds it to its commit: a transaction that took smaller numbers has committed (and is
visible) before the next one can take any. So a reader that has seen ``seq`` n never later finds
a smaller ``seq`` committed. Numbers may be skipped (a transaction rolled back after taking them),
never reordered: a reader passes the last ``seq`` it saw as ``since`` and asks again; a gap is
not a loss to wait for.

Retention (``prune``): the oldest events go once they are older than ``[changes] keep_days`` and
every active subscription has fanned them out, a bounded batch per transaction, oldest first.
The greatest ``seq`` pruned is the feed's ``horizon`` (table ``feed_meta``, moved in the same
transaction as the deletion). A reader whose ``since`` is below the horizon may have missed
events: it must re-read what it keeps (the index, by QIDO or FHIR) and go on from the horizon;
a ``since`` at or above it misses nothing (``GET /api/changes`` answers 410 below it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.registry.database import in_chunks
from gateway.registry.qido import restricted
from gateway.registry.schema import PATIENT_COLUMNS, SERIES_COLUMNS, STUDY_COLUMNS
from gateway.types import Change, Restriction

__all__ = [
    "Pending", "flush", "read", "last", "horizon", "prune", "indexed_state", "announce", "due_query",
    "backfill_activity", "COLUMNS", "PRUNE_BATCH",
]  # fmt: skip

# First key of the PostgreSQL advisory lock that orders the feed's appends (a two-key lock: no
# other lock of the gateway, all one-key, can collide with it).
_ORDER_LOCK = 7270
COLUMNS = "seq, time, kind, source, StudyInstanceUID, SeriesInstanceUID, patient, instances"
_INSERT = (
    "INSERT INTO changes (time, kind, source, StudyInstanceUID, SeriesInstanceUID, patient, instances) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_ANNOUNCE_AT_ONCE = 500  # studies announced per transaction: keeps the ordering lock short
# Events deleted per transaction: SQLite's one write lock is held ~90 ms for it at 1,000,000
# events (each event is also in two indexes, at random places: bench/changes.py --prune), so a
# harvest waits about that long at most for a pruning pass.
PRUNE_BATCH = 2000
_HORIZON = "SELECT value FROM feed_meta WHERE name = 'horizon'"


@dataclass
class Pending:
    """What one write transaction did, by (source, StudyInstanceUID, SeriesInstanceUID): the
    instances written and forgotten (their SOPInstanceUIDs), and each study's patient (INS) as
    it was before a removal took the study away."""

    added: dict[tuple[str, str, str], set[str]] = field(default_factory=dict)
    removed: dict[tuple[str, str, str], set[str]] = field(default_factory=dict)
    patients: dict[str, str | None] = field(default_factory=dict)

    def add(self, source: str, study: str, series: str, instance: str) -> None:
        self.added.setdefault((source, study, series), set()).add(instance)

    def remove(self, source: str, study: str, series: str, instance: str, patient: str | None) -> None:
        self.removed.setdefault((source, study, series), set()).add(instance)
        if patient:
            self.patients.setdefault(study, patient)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def flush(conn: Any, dialect: str, pending: Pending, now: float | None = None) -> int:
    """Append ``pending``'s events and mark their studies active, in ``conn``'s transaction (just
    before its commit: the ordering lock is held from here to there); returns the events written."""
    if not pending:
        return 0
    now = time.time() if now is None else now
    events: list[tuple[str, str, str, str, int]] = []  # kind, source, study, series, instances
    for key in sorted(pending.added.keys() | pending.removed.keys()):
        source, study, series = key
        added = pending.added.get(key, set())
        removed = pending.removed.get(key, set()) - added
        if added:
            events.append(("instances.added", source, study, series, len(added)))
        if removed:
            events.append(("instances.removed", source, study, series, len(removed)))
    studies = sorted({event[2] for event in events})
    if not studies:
        return 0
    patients = _patients(conn, studies)
    for study in studies:
        if patients.get(study) is None:
            patients[study] = pending.patients.get(study)
    _lock(conn, dialect)
    conn.executemany(
        _INSERT,
        [
            (now, kind, source, study, series, patients[study], count)
            for kind, source, study, series, count in events
        ],
    )
    # A study without a patient INS here (it went) keeps the one it had.
    conn.executemany(
        "INSERT INTO study_activity (StudyInstanceUID, patient, changed, announced, pending) "
        "VALUES (?, ?, ?, 0, 1) ON CONFLICT (StudyInstanceUID) DO UPDATE SET "
        "patient = COALESCE(excluded.patient, study_activity.patient), changed = excluded.changed, "
        "pending = 1",
        [(study, patients[study], now) for study in studies],
    )
    return len(events)


def due_query(quiet_seconds: float, now: float) -> tuple[str, tuple[Any, ...]]:
    """SQL finding whether some study waits for an announcement (one index probe: the
    announcer's idle poll, outside any transaction), with its parameters."""
    return (
        "SELECT 1 FROM study_activity WHERE pending = 1 AND changed <= ? LIMIT 1",
        (now - quiet_seconds,),
    )


def announce(conn: Any, dialect: str, quiet_seconds: float, now: float) -> list[Change]:
    """Announce the studies with no change for ``quiet_seconds`` (in ``conn``'s transaction):
    ``study.available`` the first time, ``study.updated`` later, ``study.removed`` when the study
    has gone. Under the ordering lock from the first read, so two nodes announcing at once take
    turns, and the second finds nothing left to announce."""
    _lock(conn, dialect)
    rows = conn.execute(
        "SELECT StudyInstanceUID, patient, announced FROM study_activity "
        "WHERE pending = 1 AND changed <= ? ORDER BY changed, StudyInstanceUID LIMIT ?",
        (now - quiet_seconds, _ANNOUNCE_AT_ONCE),
    ).fetchall()
    if not rows:
        return []
    uids = [row[0] for row in rows]
    current: dict[str, tuple[str | None, int]] = {}
    for chunk in in_chunks(uids):
        marks = ",".join("?" * len(chunk))
        for uid, ins, count in conn.execute(
            "SELECT st.StudyInstanceUID, p.INS, st.NumberOfStudyRelatedInstances FROM studies st "
            f"JOIN patients p ON p.id = st.patient WHERE st.StudyInstanceUID IN ({marks})",
            chunk,
        ).fetchall():
            current[uid] = (ins or None, int(count or 0))
    made: list[Change] = []
    announced: list[tuple[str | None, str]] = []
    forgotten: list[tuple[str]] = []
    for uid, patient, was_announced in rows:
        if uid in current:
            ins, count = current[uid]
            kind = "study.updated" if was_announced else "study.available"
            patient = ins or patient
            announced.append((patient, uid))
        elif was_announced:
            kind, count = "study.removed", 0
            forgotten.append((uid,))
        else:  # came and went between two announcements: nobody was told, nobody needs to be
            forgotten.append((uid,))
            continue
        row = conn.execute(_INSERT + " RETURNING seq", (now, kind, "", uid, None, patient, count)).fetchone()
        seq = row[0]
        made.append(Change(int(seq), now, kind, "", uid, None, patient, count))
    if announced:
        conn.executemany(
            "UPDATE study_activity SET announced = 1, pending = 0, patient = COALESCE(?, patient) "
            "WHERE StudyInstanceUID = ?",
            announced,
        )
    if forgotten:
        conn.executemany("DELETE FROM study_activity WHERE StudyInstanceUID = ?", forgotten)
    return made


def read(
    query: Any, dialect: str, since: int, limit: int, restriction: Restriction | None = None
) -> list[Change]:
    """Events after ``since``, in ``seq`` order, at most ``limit``, those ``restriction`` lets
    through (``query``: a function running SQL with parameters, ``Registry.query``). Patients,
    studies and hidden studies are filtered in SQL, as QIDO does, so a page is ``limit`` visible
    events read through the indexes by seq, by patient and seq, or by study and seq."""
    where, params = ["seq > ?"], [since]
    if restriction is not None:
        conditions = restricted(restriction, "patient", "StudyInstanceUID", dialect, params)
        if conditions == ["1 = 0"]:
            return []  # nothing is visible
        where += conditions
    rows = query(
        f"SELECT {COLUMNS} FROM changes WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?", [*params, limit]
    )
    return [
        Change(int(seq), float(when), kind, source, study, series, patient, int(count))
        for seq, when, kind, source, study, series, patient, count in rows
    ]


def last(query: Any) -> int:
    """The greatest ``seq`` committed (0 for an empty feed), or the horizon when everything up to
    it was pruned: where a new reader starts."""
    return max(int(query("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0]), horizon(query))


def horizon(query: Any) -> int:
    """The greatest ``seq`` pruned (0: nothing ever was). Events after it are all there."""
    rows = query(_HORIZON)
    return int(rows[0][0]) if rows else 0


def prune(conn: Any, dialect: str, older_than: float, through: int | None, batch: int = PRUNE_BATCH) -> int:
    """Delete (in ``conn``'s transaction) up to ``batch`` of the oldest events, in ``seq`` order,
    stopping at the first one at or after ``older_than`` (a time) or after ``through`` (a seq:
    the lowest cursor of the active subscriptions, None for no such bound), and move the horizon
    to the last one deleted; returns how many were deleted (fewer than ``batch``: done for now).

    Only a prefix of the feed ever goes, so the horizon says exactly what is missing: every event
    at or below it. The appends' ordering lock is not taken: deleting the oldest rows does not
    touch the newest, and two nodes pruning at once delete each row once (the horizon only
    grows)."""
    found = conn.execute(_HORIZON).fetchone()
    done = int(found[0]) if found else 0
    bound = "" if through is None else " AND seq <= ?"
    rows = conn.execute(
        f"SELECT seq, time FROM changes WHERE seq > ?{bound} ORDER BY seq LIMIT ?",
        (done, *(() if through is None else (through,)), batch),
    ).fetchall()
    taken = 0
    for _, when in rows:  # times follow seqs but for clock skew between nodes: stop at the first
        if float(when) >= older_than:
            break
        taken += 1
    if not taken:
        return 0
    last_seq = int(rows[taken - 1][0])
    conn.execute("DELETE FROM changes WHERE seq > ? AND seq <= ?", (done, last_seq))
    greatest = "GREATEST" if dialect == "postgresql" else "MAX"
    conn.execute(
        "INSERT INTO feed_meta (name, value) VALUES ('horizon', ?) ON CONFLICT (name) "
        f"DO UPDATE SET value = {greatest}(feed_meta.value, excluded.value)",
        (last_seq,),
    )
    return taken


def indexed_state(conn: Any, study: str, series: str) -> tuple[Any, ...]:
    """What a QIDO study or series answer (and a FHIR ImagingStudy) shows of ``study`` and its
    ``series``: their columns and computed attributes, and the patient's (PS3.18 Tables
    10.6.3-3 and -4). Equal before and after a write: the write changed nothing announced."""
    row = conn.execute(
        f"SELECT {_STATE} FROM studies st JOIN patients p ON p.id = st.patient "
        "LEFT JOIN series se ON se.StudyInstanceUID = st.StudyInstanceUID AND se.SeriesInstanceUID = ? "
        "WHERE st.StudyInstanceUID = ?",
        (series, study),
    ).fetchone()
    if row is None:
        return ()
    values = list(row)
    # ModalitiesInStudy is an aggregate in no particular order: compared as a set.
    values[_MODALITIES] = sorted((values[_MODALITIES] or "").split(","))
    return tuple(values)


def backfill_activity(conn: Any, now: float) -> None:
    """A registry of schema version 6 (before the feed): its studies count as already announced,
    so that their next change is ``study.updated``, not a second ``study.available``."""
    conn.execute(
        "INSERT INTO study_activity (StudyInstanceUID, patient, changed, announced, pending) "
        "SELECT st.StudyInstanceUID, p.INS, ?, 1, 0 FROM studies st JOIN patients p ON p.id = st.patient "
        "ON CONFLICT (StudyInstanceUID) DO NOTHING",
        (now,),
    )


_STATE_COLUMNS = (
    [f"p.{c}" for c in PATIENT_COLUMNS]
    + [f"st.{c}" for c in STUDY_COLUMNS]
    + ["st.ModalitiesInStudy", "st.NumberOfStudyRelatedSeries", "st.NumberOfStudyRelatedInstances"]
    + [f"se.{c}" for c in SERIES_COLUMNS]
    + ["se.NumberOfSeriesRelatedInstances"]
)
_STATE = ", ".join(_STATE_COLUMNS)
_MODALITIES = _STATE_COLUMNS.index("st.ModalitiesInStudy")


def _lock(conn: Any, dialect: str) -> None:
    # SQLite: the write transaction (BEGIN IMMEDIATE) already holds the database's one write lock.
    # PostgreSQL: keyed by schema too, so that registries in other schemas of the same database
    # (tests, staging) do not wait for each other.
    if dialect == "postgresql":
        conn.execute(f"SELECT pg_advisory_xact_lock({_ORDER_LOCK}, hashtext(current_schema()))")


def _patients(conn: Any, studies: list[str]) -> dict[str, str | None]:
    """The INS of each study's patient, for the studies still indexed."""
    found: dict[str, str | None] = {}
    for chunk in in_chunks(studies):
        marks = ",".join("?" * len(chunk))
        for uid, ins in conn.execute(
            "SELECT st.StudyInstanceUID, p.INS FROM studies st JOIN patients p ON p.id = st.patient "
            f"WHERE st.StudyInstanceUID IN ({marks})",
            chunk,
        ).fetchall():
            found[uid] = ins or None
    return found
