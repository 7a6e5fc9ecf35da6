"""The audit log writer: one record per request, appended in batches.

A viewer opening a study sends one request per frame; writing each record in its own transaction
would put a disk sync on the frame path. Records are queued in memory and appended every
``_PERIOD`` seconds (or when ``_BATCH`` are waiting) in one transaction, and always on shutdown.
A record is never dropped silently: a failed write is logged and retried on the next flush.
"""

from __future__ import annotations

import logging
import threading

import anyio
import anyio.to_thread

from gateway.access.audit_record import AuditRecord
from gateway.access.store import AccessStore
from gateway.errors import GatewayError

__all__ = ["AuditLog"]

log = logging.getLogger("gateway.audit")

_PERIOD = 0.2  # seconds between flushes
_BATCH = 512  # records that trigger a flush before the period ends
_MAX_PENDING = 100_000  # beyond this the writer is failing: requests are refused (503) instead


class AuditLog:
    def __init__(self, store: AccessStore) -> None:
        self.store = store
        self._pending: list[AuditRecord] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def append(self, record: AuditRecord) -> None:
        with self._lock:
            self._pending.append(record)
            if len(self._pending) >= _BATCH:
                self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def healthy(self) -> bool:
        return len(self._pending) < _MAX_PENDING

    def flush(self) -> int:
        """Append what is waiting; returns how many records were written."""
        with self._lock:
            batch, self._pending = self._pending, []
            self._wake.clear()
        if not batch:
            return 0
        try:
            self.store.append_audit(batch)
        except GatewayError as exc:
            log.error("audit: %d records not written yet (%s); retrying", len(batch), exc.message)
            with self._lock:
                self._pending[:0] = batch
            return 0
        return len(batch)

    async def run(self) -> None:
        """Flush periodically until cancelled, then once more."""
        try:
            while True:
                await anyio.to_thread.run_sync(self._wake.wait, _PERIOD, abandon_on_cancel=True)
                await anyio.to_thread.run_sync(self.flush)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.flush)
