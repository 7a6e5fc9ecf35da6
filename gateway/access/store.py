"""What patients decided and what happened: grants, hidden studies, emergency accesses, study
links and their sessions, and the audit log, in their own SQLite database.

Kept apart from the registry on purpose: the registry is an index that harvest can rebuild at any
time (a schema change empties it); none of this can be rebuilt. The schema is migrated forward
(``_MIGRATIONS``), never dropped. The audit table refuses UPDATE and DELETE (triggers).

Secrets (link tokens, session cookies) are stored as SHA-256 digests only.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from gateway.access.record import AuditRecord
from gateway.errors import RegistryError

__all__ = ["AccessStore", "digest", "new_secret"]

_MIGRATIONS = [
    """
    CREATE TABLE grants (
        id TEXT PRIMARY KEY, patient TEXT NOT NULL, grantee TEXT NOT NULL,
        created REAL NOT NULL, expires REAL, revoked REAL);
    CREATE INDEX grants_patient ON grants (patient, grantee);
    CREATE TABLE hidden (
        StudyInstanceUID TEXT PRIMARY KEY, patient TEXT NOT NULL, created REAL NOT NULL);
    CREATE TABLE emergency (
        id TEXT PRIMARY KEY, patient TEXT NOT NULL, actor TEXT NOT NULL, organization TEXT,
        reason TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL);
    CREATE INDEX emergency_actor ON emergency (actor, patient);
    CREATE TABLE links (
        id TEXT PRIMARY KEY, secret TEXT NOT NULL UNIQUE, StudyInstanceUID TEXT NOT NULL,
        patient TEXT, creator TEXT NOT NULL, creator_role TEXT NOT NULL,
        created REAL NOT NULL, expires REAL NOT NULL, revoked REAL);
    CREATE INDEX links_creator ON links (creator);
    CREATE TABLE sessions (
        secret TEXT PRIMARY KEY, link TEXT NOT NULL REFERENCES links(id), expires REAL NOT NULL);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, request_id TEXT NOT NULL,
        actor TEXT NOT NULL, role TEXT NOT NULL, action TEXT NOT NULL, outcome TEXT NOT NULL,
        status INTEGER NOT NULL, patient TEXT, study TEXT, organization TEXT,
        emergency INTEGER NOT NULL, reason TEXT, source TEXT, bytes_sent INTEGER NOT NULL,
        client TEXT, path TEXT);
    CREATE INDEX audit_patient ON audit (patient, time);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
]
_AUDIT_COLUMNS = [f.name for f in fields(AuditRecord) if f.name != "id"]


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


class AccessStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            conn = self._conn()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot create the access database {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise RegistryError(f"access database write failed: {exc}") from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise RegistryError(f"access database query failed: {exc}") from exc

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- grants, hidden studies, emergency access ------------------------------------------------

    def add_grant(self, patient: str, grantee: str, expires: float | None) -> dict[str, Any]:
        row: dict[str, Any] = {"id": secrets.token_hex(8), "patient": patient, "grantee": grantee}
        row |= {"created": time.time(), "expires": expires, "revoked": None}
        with self._write() as conn:
            conn.execute(
                "INSERT INTO grants VALUES (:id, :patient, :grantee, :created, :expires, :revoked)", row
            )
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

    def hide(self, study: str, patient: str) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO hidden VALUES (?, ?, ?)", (study, patient, time.time()))

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

    def is_hidden(self, study: str) -> bool:
        return bool(self._rows("SELECT 1 FROM hidden WHERE StudyInstanceUID=?", (study,)))

    def open_emergency(
        self, patient: str, actor: str, organization: str | None, reason: str, expires: float
    ) -> dict[str, Any]:
        row: dict[str, Any] = {"id": secrets.token_hex(8), "patient": patient, "actor": actor}
        row["organization"] = organization
        row |= {"reason": reason, "created": time.time(), "expires": expires}
        with self._write() as conn:
            conn.execute(
                "INSERT INTO emergency VALUES "
                "(:id, :patient, :actor, :organization, :reason, :created, :expires)",
                row,
            )
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
        self, study: str, patient: str | None, creator: str, creator_role: str, expires: float
    ) -> tuple[dict[str, Any], str]:
        """A new link and its secret (returned once; only its digest is kept)."""
        secret = new_secret()
        row: dict[str, Any] = {
            "id": secrets.token_hex(8),
            "secret": digest(secret),
            "StudyInstanceUID": study,
        }
        row |= {"patient": patient, "creator": creator, "creator_role": creator_role}
        row |= {"created": time.time(), "expires": expires, "revoked": None}
        with self._write() as conn:
            conn.execute(
                "INSERT INTO links VALUES (:id, :secret, :StudyInstanceUID, :patient, :creator, "
                ":creator_role, :created, :expires, :revoked)",
                row,
            )
        return row, secret

    def links(self, creator: str) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM links WHERE creator=? ORDER BY created", (creator,))
        return [{k: r[k] for k in r.keys() if k != "secret"} for r in rows]

    def link_by_secret(self, secret: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM links WHERE secret=?", (digest(secret),))
        return dict(rows[0]) if rows else None

    def revoke_link(self, creator: str, link_id: str) -> dict[str, Any] | None:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE links SET revoked=? WHERE id=? AND creator=? AND revoked IS NULL",
                (time.time(), link_id, creator),
            )
            if cursor.rowcount != 1:
                return None
            conn.execute("DELETE FROM sessions WHERE link=?", (link_id,))
            row = conn.execute("SELECT * FROM links WHERE id=?", (link_id,)).fetchone()
        return dict(row)

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
        marks = ", ".join(f":{name}" for name in _AUDIT_COLUMNS)
        with self._write() as conn:
            conn.executemany(f"INSERT INTO audit ({columns}) VALUES ({marks})", [asdict(r) for r in records])

    def audit(
        self, patient: str | None = None, limit: int = 1000, before: int | None = None
    ) -> list[AuditRecord]:
        where: list[str] = []
        params: list[Any] = []
        if patient is not None:
            where.append("patient = ?")
            params.append(patient)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        sql = "SELECT * FROM audit" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = self._rows(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
        return [AuditRecord(**{**dict(r), "emergency": bool(r["emergency"])}) for r in rows]

    def audit_count(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM audit")[0][0])
