"""What patients decided and what happened: grants, hidden studies, emergency accesses, study
links and their sessions, and the audit log: in a SQLite file of their own, or in PostgreSQL
(the registry's database, tables of their own), where every node sees the same decisions.

Kept apart from the registry on purpose: the registry is an index that harvest can rebuild at any
time (a schema change empties it); none of this can be rebuilt. The schema is migrated forward
(``_migrations``), never dropped. The audit table refuses UPDATE and DELETE (triggers).

Secrets (link tokens, session cookies) are stored as SHA-256 digests only.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from gateway.access.audit_record import AuditRecord
from gateway.errors import RegistryError
from gateway.registry.database import open_database

__all__ = ["AccessStore", "digest", "new_secret"]


def _migrations(dialect: str) -> list[list[str]]:
    """Forward migrations, one list of statements per version; never edited once released."""
    real, serial = ("REAL", "INTEGER PRIMARY KEY AUTOINCREMENT")
    if dialect == "postgresql":
        real, serial = ("DOUBLE PRECISION", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    first = [
        f"""CREATE TABLE grants (
        id TEXT PRIMARY KEY, patient TEXT NOT NULL, grantee TEXT NOT NULL,
        created {real} NOT NULL, expires {real}, revoked {real})""",
        "CREATE INDEX grants_patient ON grants (patient, grantee)",
        f"""CREATE TABLE hidden (
        StudyInstanceUID TEXT PRIMARY KEY, patient TEXT NOT NULL, created {real} NOT NULL)""",
        f"""CREATE TABLE emergency (
        id TEXT PRIMARY KEY, patient TEXT NOT NULL, actor TEXT NOT NULL, organization TEXT,
        reason TEXT NOT NULL, created {real} NOT NULL, expires {real} NOT NULL)""",
        "CREATE INDEX emergency_actor ON emergency (actor, patient)",
        f"""CREATE TABLE links (
        id TEXT PRIMARY KEY, secret TEXT NOT NULL UNIQUE, StudyInstanceUID TEXT NOT NULL,
        patient TEXT, creator TEXT NOT NULL, creator_role TEXT NOT NULL,
        created {real} NOT NULL, expires {real} NOT NULL, revoked {real})""",
        "CREATE INDEX links_creator ON links (creator)",
        f"""CREATE TABLE sessions (
        secret TEXT PRIMARY KEY, link TEXT NOT NULL REFERENCES links(id), expires {real} NOT NULL)""",
        f"""CREATE TABLE audit (
        id {serial}, time {real} NOT NULL, request_id TEXT NOT NULL,
        actor TEXT NOT NULL, role TEXT NOT NULL, action TEXT NOT NULL, outcome TEXT NOT NULL,
        status INTEGER NOT NULL, patient TEXT, study TEXT, organization TEXT,
        emergency INTEGER NOT NULL, reason TEXT, source TEXT, bytes_sent BIGINT NOT NULL,
        client TEXT, path TEXT)""",
        "CREATE INDEX audit_patient ON audit (patient, time)",
    ]
    if dialect == "postgresql":
        first += [
            """CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS
            'BEGIN RAISE EXCEPTION ''the audit log is append-only''; END'""",
            """CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
            FOR EACH ROW EXECUTE FUNCTION audit_append_only()""",
        ]
    else:
        first += [
            """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
            """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
        ]
    # 2: every patient a response carried (a QIDO answer can hold several), a transfer's end,
    # the caller's issuer; a link's basis (the grants that let its creator make it: consent is
    # checked against them at each use).
    second = [
        f"ALTER TABLE audit ADD COLUMN ended {real}",
        "ALTER TABLE audit ADD COLUMN issuer TEXT",
        "CREATE INDEX audit_request ON audit (request_id)",
        f"""CREATE TABLE audit_patients (
        request_id TEXT NOT NULL, patient TEXT NOT NULL, time {real} NOT NULL)""",
        "CREATE INDEX audit_patients_patient ON audit_patients (patient, time)",
        "INSERT INTO audit_patients SELECT request_id, patient, time FROM audit WHERE patient IS NOT NULL",
        "ALTER TABLE links ADD COLUMN basis TEXT",
        "CREATE INDEX links_patient ON links (patient)",
    ]
    if dialect == "postgresql":
        second.append(
            """CREATE TRIGGER audit_patients_append_only BEFORE UPDATE OR DELETE ON audit_patients
            FOR EACH ROW EXECUTE FUNCTION audit_append_only()"""
        )
    else:
        second += [
            """CREATE TRIGGER audit_patients_no_update BEFORE UPDATE ON audit_patients
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
            """CREATE TRIGGER audit_patients_no_delete BEFORE DELETE ON audit_patients
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
        ]
    # 3: subscriptions (gateway.notify): who asked to be told what, where, and the durable outbox
    # of what is owed to each (one row per event and subscription; its SQL is gateway/notify/store.py).
    third = [
        f"""CREATE TABLE subscriptions (
        id TEXT PRIMARY KEY, issuer TEXT, subject TEXT NOT NULL, role TEXT NOT NULL,
        organization TEXT, patient TEXT, channel TEXT NOT NULL, endpoint TEXT NOT NULL,
        header TEXT, payload TEXT NOT NULL, created {real} NOT NULL, revoked {real},
        cursor BIGINT NOT NULL)""",
        "CREATE INDEX subscriptions_owner ON subscriptions (issuer, subject)",
        f"""CREATE TABLE outbox (
        id {serial}, subscription TEXT NOT NULL REFERENCES subscriptions(id), seq BIGINT NOT NULL,
        kind TEXT NOT NULL, StudyInstanceUID TEXT NOT NULL, patient TEXT, time {real} NOT NULL,
        state TEXT NOT NULL, attempts INTEGER NOT NULL, due {real} NOT NULL, done {real},
        error TEXT, UNIQUE (subscription, seq))""",
        "CREATE INDEX outbox_pending ON outbox (state, subscription, seq)",
    ]
    # 4: the outbox's retention (gateway/notify/store.py ``prune``) finds settled rows by when
    # they were settled (``done`` is NULL while pending).
    fourth = ["CREATE INDEX outbox_done ON outbox (done)"]
    return [first, second, third, fourth]


_AUDIT_COLUMNS = [f.name for f in fields(AuditRecord) if f.name not in ("id", "patients")]
_AUDIT_ROWS = 100  # records per INSERT statement


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


class AccessStore:
    def __init__(self, url: str) -> None:
        """``url``: ``sqlite:///PATH`` or ``postgresql://...``."""
        self.db = open_database(url, ("StudyInstanceUID",), meta="access_meta")
        self.where = self.db.where
        try:
            self.db.migrate(_migrations(self.db.dialect))
        except RegistryError as exc:
            raise RegistryError(f"cannot create the access tables in {self.where}: {exc.message}") from exc

    def _write(self) -> Any:
        return self.db.transaction()

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        return self.db.query(sql, params)

    def close(self) -> None:
        self.db.close()

    # -- grants, hidden studies, emergency access ------------------------------------------------

    def add_grant(self, patient: str, grantee: str, expires: float | None) -> dict[str, Any]:
        row: dict[str, Any] = {"id": secrets.token_hex(8), "patient": patient, "grantee": grantee}
        row |= {"created": time.time(), "expires": expires, "revoked": None}
        with self._write() as conn:
            conn.execute("INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?)", tuple(row.values()))
        return row

    def grants(self, patient: str) -> list[dict[str, Any]]:
        return [
            dict(r) for r in self._rows("SELECT * FROM grants WHERE patient=? ORDER BY created", (patient,))
        ]

    def revoke_grant(self, patient: str, grant_id: str) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE grants SET revoked=? WHERE id=? AND patient=? AND revoked IS NULL",
                (time.time(), grant_id, patient),
            )
        return cursor.rowcount == 1

    def granted_patients(self, grantee_keys: tuple[str, ...], now: float) -> set[str]:
        marks = ",".join("?" * len(grantee_keys))
        rows = self._rows(
            f"SELECT DISTINCT patient FROM grants WHERE grantee IN ({marks}) AND revoked IS NULL "
            "AND (expires IS NULL OR expires > ?)",
            (*grantee_keys, now),
        )
        return {r[0] for r in rows}

    def qualify_grantees(self, issuer: str) -> int:
        """Grants written before grantees were named within their issuer (``pro:<RPPS>``) are
        given ``issuer``, the one professional issuer configured; returns how many."""
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE grants SET grantee = substr(grantee, 1, 4) || ? || '|' || substr(grantee, 5) "
                "WHERE (grantee LIKE ? OR grantee LIKE ?) AND grantee NOT LIKE ?",
                (issuer, "pro:%", "org:%", "%|%"),
            )
        return max(cursor.rowcount, 0)

    def hide(self, study: str, patient: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO hidden VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (study, patient, time.time())
            )

    def unhide(self, study: str, patient: str) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "DELETE FROM hidden WHERE StudyInstanceUID=? AND patient=?", (study, patient)
            )
        return cursor.rowcount == 1

    def hidden(self, patient: str | None = None) -> set[str]:
        if patient is None:
            return {r[0] for r in self._rows("SELECT StudyInstanceUID FROM hidden")}
        return {r[0] for r in self._rows("SELECT StudyInstanceUID FROM hidden WHERE patient=?", (patient,))}

    def hidden_of(self, patients: Iterable[str]) -> set[str]:
        """The studies hidden by any of ``patients``, in one query (a grant to an organization can
        cover many patients)."""
        patients = list(patients)
        if not patients:
            return set()
        marks = ",".join("?" * len(patients))
        rows = self._rows(f"SELECT StudyInstanceUID FROM hidden WHERE patient IN ({marks})", patients)
        return {r[0] for r in rows}

    def is_hidden(self, study: str) -> bool:
        return bool(self._rows("SELECT 1 FROM hidden WHERE StudyInstanceUID=?", (study,)))

    def open_emergency(
        self, patient: str, actor: str, organization: str | None, reason: str, expires: float
    ) -> dict[str, Any]:
        row: dict[str, Any] = {"id": secrets.token_hex(8), "patient": patient, "actor": actor}
        row["organization"] = organization
        row |= {"reason": reason, "created": time.time(), "expires": expires}
        with self._write() as conn:
            conn.execute("INSERT INTO emergency VALUES (?, ?, ?, ?, ?, ?, ?)", tuple(row.values()))
        return row

    def emergency_patients(self, actor: str, now: float) -> set[str]:
        rows = self._rows(
            "SELECT DISTINCT patient FROM emergency WHERE actor=? AND expires > ?", (actor, now)
        )
        return {r[0] for r in rows}

    def emergencies(self, patient: str) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM emergency WHERE patient=? ORDER BY created", (patient,))
        return [dict(r) for r in rows]

    # -- study links and their sessions -----------------------------------------------------------

    def add_link(
        self,
        study: str,
        patient: str | None,
        creator: str,
        creator_role: str,
        expires: float,
        basis: tuple[str, ...] = (),
    ) -> tuple[dict[str, Any], str]:
        """A new link and its secret (returned once; only its digest is kept). ``basis``: the
        grantee keys that let a professional make it; the link works while the patient's grant to
        one of them does (``link_consented``)."""
        secret = new_secret()
        row: dict[str, Any] = {
            "id": secrets.token_hex(8),
            "secret": digest(secret),
            "StudyInstanceUID": study,
        }
        row |= {"patient": patient, "creator": creator, "creator_role": creator_role}
        row |= {"created": time.time(), "expires": expires, "revoked": None}
        row["basis"] = "\n".join(basis) or None
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO links ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
        return row, secret

    def links(
        self, creator: str, everything: bool = False, limit: int = 1000, patient: str | None = None
    ) -> list[dict[str, Any]]:
        """The links ``creator`` made, and with ``patient`` every link to that patient's studies
        (whoever made it), newest first: the active ones, or ``everything`` (revoked and expired
        too), at most ``limit``."""
        mine = "(creator=? OR patient=?)" if patient else "creator=?"
        params: tuple[Any, ...] = (creator, patient) if patient else (creator,)
        active = "" if everything else " AND revoked IS NULL AND expires > ?"
        params += () if everything else (time.time(),)
        rows = self._rows(
            f"SELECT * FROM links WHERE {mine}{active} ORDER BY created DESC LIMIT ?", (*params, limit)
        )
        return [{k: r[k] for k in r.keys() if k not in ("secret", "basis")} for r in rows]

    def link_by_secret(self, secret: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM links WHERE secret=?", (digest(secret),))
        return dict(rows[0]) if rows else None

    def revoke_link(self, creator: str, link_id: str, patient: str | None = None) -> dict[str, Any] | None:
        """Revoke a link its ``creator`` made, or, given ``patient``, any link to their studies."""
        mine = "(creator=? OR patient=?)" if patient else "creator=?"
        owner: tuple[Any, ...] = (creator, patient) if patient else (creator,)
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE links SET revoked=? WHERE id=? AND {mine} AND revoked IS NULL",
                (time.time(), link_id, *owner),
            )
            if cursor.rowcount != 1:
                return None
            conn.execute("DELETE FROM sessions WHERE link=?", (link_id,))
            row = conn.execute("SELECT * FROM links WHERE id=?", (link_id,)).fetchone()
        return dict(row)

    def link_consented(self, link_id: str, now: float) -> bool:
        """Does the consent a link was made under still hold? A patient's own link (and a demo's)
        holds while the link does; a professional's while the patient's grant to them or their
        organization does (revoked or expired grants end the links made under them)."""
        rows = self._rows("SELECT patient, creator_role, basis FROM links WHERE id=?", (link_id,))
        if not rows:
            return False
        patient, role, basis = rows[0][0], rows[0][1], rows[0][2]
        if role in ("patient", "open"):
            return True
        keys = [key for key in (basis or "").split("\n") if key]
        if role != "professional" or not keys or not patient:
            return False  # made before links kept their basis: closed rather than unchecked
        return patient in self.granted_patients(tuple(keys), now)

    def add_session(self, link_id: str, expires: float) -> str:
        secret = new_secret()
        with self._write() as conn:
            conn.execute("DELETE FROM sessions WHERE expires < ?", (time.time(),))
            conn.execute("INSERT INTO sessions VALUES (?, ?, ?)", (digest(secret), link_id, expires))
        return secret

    def session_link(self, secret: str, now: float) -> dict[str, Any] | None:
        """The link behind a session cookie, if both are still valid (checked on every request,
        so a revocation takes effect at once)."""
        rows = self._rows(
            "SELECT l.* FROM sessions s JOIN links l ON l.id = s.link WHERE s.secret=? AND s.expires > ? "
            "AND l.expires > ? AND l.revoked IS NULL",
            (digest(secret), now, now),
        )
        return dict(rows[0]) if rows else None

    # -- audit --------------------------------------------------------------------------------------

    def append_audit(self, records: list[AuditRecord]) -> None:
        columns = ", ".join(_AUDIT_COLUMNS)
        row = "(" + ", ".join("?" * len(_AUDIT_COLUMNS)) + ")"
        with self._write() as conn:
            for start in range(0, len(records), _AUDIT_ROWS):
                batch = records[start : start + _AUDIT_ROWS]
                # Booleans as integers (PostgreSQL does not cast them to INTEGER).
                values = [
                    int(value) if isinstance(value, bool) else value
                    for record in batch
                    for value in (getattr(record, name) for name in _AUDIT_COLUMNS)
                ]
                conn.execute(f"INSERT INTO audit ({columns}) VALUES {', '.join([row] * len(batch))}", values)
                named = [(r.request_id, p, r.time) for r in batch for p in r.patients]
                for first in range(0, len(named), _AUDIT_ROWS):
                    part = named[first : first + _AUDIT_ROWS]
                    conn.execute(
                        f"INSERT INTO audit_patients VALUES {', '.join(['(?, ?, ?)'] * len(part))}",
                        [value for item in part for value in item],
                    )

    def audit(
        self,
        patient: str | None = None,
        limit: int = 1000,
        before: int | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[AuditRecord]:
        """Records newest first: all of them, or those naming ``patient`` (among every patient
        the response carried); ``before``: a record id (the cursor of the next page);
        ``since``/``until``: request times, ``since`` <= time < ``until``."""
        where: list[str] = []
        params: list[Any] = []
        source = "audit a"
        if patient is not None:
            # From the patient's entries (an index range), not a walk of the whole log.
            source = "audit_patients ap JOIN audit a ON a.request_id = ap.request_id"
            where.append("ap.patient = ?")
            params.append(patient)
        for condition, value in (("a.id < ?", before), ("a.time >= ?", since), ("a.time < ?", until)):
            if value is not None:
                where.append(condition)
                params.append(value)
        sql = f"SELECT a.* FROM {source}" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = self._rows(sql + " ORDER BY a.id DESC LIMIT ?", (*params, limit))
        records = [dict(r) for r in rows]
        named: dict[str, list[str]] = {}
        if records:
            marks = ",".join("?" * len(records))
            for request_id, name in self._rows(
                f"SELECT request_id, patient FROM audit_patients WHERE request_id IN ({marks})",
                [r["request_id"] for r in records],
            ):
                named.setdefault(request_id, []).append(name)
        return [
            AuditRecord(
                **{**r, "emergency": bool(r["emergency"])}, patients=tuple(named.get(r["request_id"], ()))
            )
            for r in records
        ]

    def audit_count(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM audit")[0][0])
