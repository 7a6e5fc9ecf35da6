"""How a DIMSE PACS's replies are judged, for C-FIND, C-GET and C-MOVE alike: their statuses
(PS3.7 Annex C), the deadline over a whole operation, and what counts as a final success.

Deadlines: ``message`` for each DIMSE message (pynetdicom's DIMSE and network timeouts), ``total``
for a whole C-FIND or C-GET: a stream of "pending" replies does not reset it (pynetdicom#825), and
the association is aborted when it passes. Partial C-GET/C-MOVE (sub-operations failed: status
B000 or a failure) is an error (pynetdicom#552).
"""

from __future__ import annotations

import time

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from gateway.config import Deadlines
from gateway.errors import SourceError, SourceTimeout, SourceUnavailable

__all__ = ["Replies", "PENDING"]

PENDING = frozenset({0xFF00, 0xFF01})  # Pending: more replies follow (PS3.4 C.4)


class Replies:
    """The replies of one source's operations, turned into status codes or errors naming it."""

    def __init__(self, name: str, deadlines: Deadlines) -> None:
        self.name = name
        self.deadlines = deadlines

    def status(self, status: Dataset, what: str, started: float | None = None) -> int:
        """The status code of a reply that is pending, a success or a warning; an error otherwise."""
        if not status or "Status" not in status:
            if started is not None and time.monotonic() - started < self.deadlines.message * 0.9:
                raise SourceUnavailable(
                    f"source {self.name}: {what} was cut short: the PACS aborted the association "
                    "(is this gateway's AE title known to it?)"
                )
            raise SourceTimeout(
                f"source {self.name}: {what} got no reply within {self.deadlines.message:g} s "
                "(or the association was aborted)"
            )
        code = int(status.Status)
        if code in PENDING or code == 0x0000 or code & 0xF000 == 0xB000:
            return code
        raise SourceError(f"source {self.name}: {what} failed with status {code:04X}")

    def check_deadline(self, assoc: Association, deadline: float, what: str) -> None:
        """Abort the association once the whole operation passed its deadline (monotonic)."""
        if time.monotonic() > deadline:
            assoc.abort()
            raise SourceTimeout(f"source {self.name}: {what} took longer than {self.deadlines.total:g} s")

    def final(self, status: Dataset | None, what: str) -> None:
        """Only full success is success: a warning or failure with failed sub-operations is not
        (C-MOVE and C-GET statuses, PS3.4 C.4.2 and C.4.3)."""
        if status is None:
            raise SourceError(f"source {self.name}: {what} ended without a final status")
        code = int(status.Status)
        failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
        if code == 0x0000 and not failed:
            return
        done = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
        raise SourceError(
            f"source {self.name}: {what} ended with status {code:04X}: {failed} sub-operation(s) failed, "
            f"{done} completed"
        )
