"""Subscriptions and the outbox: their SQL, in the access database (tables made by the access
store's migration 3, ``gateway.access.store._migrations``).

A subscription's ``cursor`` is the sequence number of the last feed event fanned out for it; the
outbox holds one row per (subscription, event) owed to it, ``pending`` until it is ``delivered``
(acknowledged) or ``withheld`` (consent no longer holds: nothing sent). Rows are written with the
cursor in one transaction and are unique per (subscription, seq), so a fan-out repeated after a
crash adds nothing twice. Everything is in the database: a restarted gateway, or another node,
carries on where the last pass stopped.

Retention (``prune``): settled rows (``delivered``, ``withheld``) go once older than ``[notify]
keep_days``, a bounded batch per transaction, and then revoked subscriptions as old with no row
left. The audit trail, not the outbox, is the durable record of each delivery: it is never pruned.
A revoked subscription's pending rows are withheld as it is revoked (``revoke``), so none lingers.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.registry.database import Database

__all__ = ["Subscription", "Pending", "SubscriptionStore", "CHANNELS", "PAYLOADS"]

CHANNELS = ("rest-hook", "mllp")
PAYLOADS = ("id-only", "full")
PRUNE_BATCH = 500  # outbox rows deleted per transaction (bound parameters of one statement)
_REVOKED = "subscription revoked"


@dataclass(frozen=True)
class Subscription:
    id: str
    issuer: str | None  # the owner is (issuer, subject), never a bare subject
    subject: str
    role: str  # the owner's role when subscribing: "professional" or "system"
    organization: str | None  # the owner's organization then: grants to it count
    patient: str | None  # scope: one patient's INS, or None for every patient who granted the owner
    channel: str  # one of CHANNELS
    endpoint: str  # https://... (rest-hook) or mllp://host:port
    header: str | None  # rest-hook: one "Name: value" header sent with each notification (a secret)
    payload: str  # one of PAYLOADS
    created: float
    revoked: float | None
    cursor: int  # the last feed seq fanned out for it


@dataclass(frozen=True)
class Pending:
    """One outbox row owed to a subscription."""

    id: int
    subscription: str
    seq: int
    kind: str
    StudyInstanceUID: str
    patient: str | None
    time: float  # when the event happened
    attempts: int
    due: float  # not attempted before this time


_SUBSCRIPTION = [name for name in Subscription.__dataclass_fields__]
_PENDING = ", ".join(Pending.__dataclass_fields__)


class SubscriptionStore:
    def __init__(self, db: Database) -> None:
        """``db``: the access store's database (``AccessStore.db``), migrated to version 3."""
        self.db = db

    # -- subscriptions --------------------------------------------------------------------------

    def add(self, **fields: Any) -> Subscription:
        """A new subscription; ``fields`` are :class:`Subscription`'s but id, created, revoked."""
        row = {"id": secrets.token_hex(8), **fields, "created": time.time(), "revoked": None}
        subscription = Subscription(**{name: row[name] for name in _SUBSCRIPTION})
        with self.db.transaction() as conn:
            conn.execute(
                f"INSERT INTO subscriptions ({', '.join(_SUBSCRIPTION)}) "
                f"VALUES ({', '.join('?' * len(_SUBSCRIPTION))})",
                [getattr(subscription, name) for name in _SUBSCRIPTION],
            )
        return subscription

    def owned(self, issuer: str | None, subject: str, everything: bool = False) -> list[Subscription]:
        """The owner's subscriptions, newest first (``everything``: revoked ones too)."""
        active = "" if everything else " AND revoked IS NULL"
        rows = self.db.query(
            f"SELECT * FROM subscriptions WHERE issuer = ? AND subject = ?{active} ORDER BY created DESC",
            (issuer, subject),
        )
        return [_subscription(row) for row in rows]

    def active(self) -> list[Subscription]:
        return [_subscription(r) for r in self.db.query("SELECT * FROM subscriptions WHERE revoked IS NULL")]

    def get(self, subscription: str) -> Subscription | None:
        rows = self.db.query("SELECT * FROM subscriptions WHERE id = ?", (subscription,))
        return _subscription(rows[0]) if rows else None

    def revoke(self, issuer: str | None, subject: str, subscription: str) -> bool:
        """Revoke one of the owner's subscriptions; what it was still owed is never sent: its
        pending rows are withheld in the same transaction."""
        now = time.time()
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE subscriptions SET revoked = ? WHERE id = ? AND issuer = ? "
                "AND subject = ? AND revoked IS NULL",
                (now, subscription, issuer, subject),
            )
            revoked = cursor.rowcount == 1
            if revoked:
                conn.execute(
                    "UPDATE outbox SET state = 'withheld', done = ?, error = ? "
                    "WHERE subscription = ? AND state = 'pending'",
                    (now, _REVOKED, subscription),
                )
        return bool(revoked)

    def exclusive(self) -> Any:
        """The section one node at a time runs a pass in (a context manager: True if held). On
        PostgreSQL advisory locks are per database: named after the schema too, so gateways
        on one database in schemas of their own do not wait for one another."""
        name = "notify"
        if self.db.dialect == "postgresql":
            name += ":" + str(self.db.query("SELECT current_schema()")[0][0])
        return self.db.exclusive(name)

    def max_cursor(self) -> int:
        rows = self.db.query("SELECT MAX(cursor) FROM subscriptions")
        return int(rows[0][0] or 0)

    def lowest_cursor(self) -> int | None:
        """The lowest cursor of the active subscriptions (None: there are none): every feed event
        up to it has been fanned out to all of them, and may be pruned from the feed."""
        rows = self.db.query("SELECT MIN(cursor) FROM subscriptions WHERE revoked IS NULL")
        return None if rows[0][0] is None else int(rows[0][0])

    # -- the outbox -------------------------------------------------------------------------------

    def enqueue(self, cursors: dict[str, int], rows: Sequence[tuple[Any, ...]]) -> None:
        """Queue ``rows`` (subscription, seq, kind, StudyInstanceUID, patient, time) and move each
        subscription's cursor forward to ``cursors[id]``, in one transaction."""
        now = time.time()
        with self.db.transaction() as conn:
            for start in range(0, len(rows), 100):
                part = rows[start : start + 100]
                conn.execute(
                    "INSERT INTO outbox (subscription, seq, kind, StudyInstanceUID, patient, time, state, "
                    "attempts, due) VALUES "
                    + ", ".join(["(?, ?, ?, ?, ?, ?, 'pending', 0, ?)"] * len(part))
                    + " ON CONFLICT DO NOTHING",
                    [value for row in part for value in (*row, now)],
                )
            for subscription, cursor in cursors.items():
                conn.execute(
                    "UPDATE subscriptions SET cursor = ? WHERE id = ? AND cursor < ?",
                    (cursor, subscription, cursor),
                )

    def oldest_pending(self, subscriptions: Sequence[str], limit: int) -> dict[str, list[Pending]]:
        """Up to ``limit`` pending rows of each subscription, oldest first (only the first is ever
        attempted: order per subscriber)."""
        out: dict[str, list[Pending]] = {}
        for start in range(0, len(subscriptions), 200):
            part = list(subscriptions[start : start + 200])
            marks = ",".join("?" * len(part))
            rows = self.db.query(
                f"SELECT {_PENDING} FROM (SELECT {_PENDING}, ROW_NUMBER() OVER "
                "(PARTITION BY subscription ORDER BY seq) AS n FROM outbox "
                f"WHERE state = 'pending' AND subscription IN ({marks})) AS p WHERE n <= ? "
                "ORDER BY subscription, seq",
                [*part, limit],
            )
            for row in rows:
                out.setdefault(row["subscription"], []).append(Pending(*row))
        return out

    def settle(self, row: int, state: str, error: str | None = None) -> None:
        """``row`` is ``delivered`` or ``withheld``: never attempted again."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET state = ?, done = ?, error = ?, attempts = attempts + 1 WHERE id = ?",
                (state, time.time(), error, row),
            )

    def retry_later(self, row: int, due: float, error: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, due = ?, error = ? WHERE id = ?",
                (due, error[:500], row),
            )

    def prune(self, older_than: float, batch: int = PRUNE_BATCH) -> int:
        """Retention: delete the rows settled before ``older_than`` (a time), ``batch`` per
        transaction, then the subscriptions revoked before it that have no row left; returns the
        rows deleted. Pending rows of revoked subscriptions (a fan-out that raced the revocation,
        or a database from before ``revoke`` withheld them) are withheld first, so they go too
        in their time. Found through ``outbox_done`` (access migration 4): a pass costs what it
        deletes, not the outbox's size."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET state = 'withheld', done = COALESCE(done, ?), error = ? "
                "WHERE state = 'pending' AND subscription IN "
                "(SELECT id FROM subscriptions WHERE revoked IS NOT NULL)",
                (time.time(), _REVOKED),
            )
        total = 0
        while True:
            # Chosen outside the write transaction: SQLite's one write lock is held for the
            # deletion only.
            ids = [
                row[0]
                for row in self.db.query(
                    "SELECT id FROM outbox WHERE done < ? AND state IN ('delivered', 'withheld') "
                    "ORDER BY done LIMIT ?",
                    (older_than, batch),
                )
            ]
            if ids:
                with self.db.transaction() as conn:
                    conn.execute(
                        f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(ids))}) "
                        "AND state IN ('delivered', 'withheld')",
                        ids,
                    )
            total += len(ids)
            if len(ids) < batch:
                break
        with self.db.transaction() as conn:
            conn.execute(
                "DELETE FROM subscriptions WHERE revoked IS NOT NULL AND revoked < ? AND NOT EXISTS "
                "(SELECT 1 FROM outbox o WHERE o.subscription = subscriptions.id)",
                (older_than,),
            )
        return total

    def outbox(self, subscription: str) -> list[dict[str, Any]]:
        """Every row of a subscription, in order (for tests and operators)."""
        rows = self.db.query("SELECT * FROM outbox WHERE subscription = ? ORDER BY seq", (subscription,))
        return [dict(zip(row.keys(), row, strict=True)) for row in rows]


def _subscription(row: Any) -> Subscription:
    return Subscription(**{name: row[name] for name in _SUBSCRIPTION})
