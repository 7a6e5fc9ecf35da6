"""Retrieval from a DIMSE PACS: C-GET on our association, or C-MOVE to our own Storage SCP, and
what is accepted of what comes.

pynetdicom is threaded; each retrieval runs in a worker thread and hands every accepted instance
to the async caller through a bounded queue (``asyncio.Queue(2)``): a slow client slows the C-GET
instead of filling memory.

Received data must be what was asked for: each instance that comes (C-GET on our association,
C-MOVE on our Storage SCP) is kept only when its data set's own Study, Series and SOP Instance UIDs
are those of a retrieval under way, and its C-STORE names the same instance; anything else is
refused with a C-STORE failure status and never served, cached or learnt. A C-GET that brought
something else is an error naming what was asked and what came. Who may connect to the Storage SCP,
and how large an instance may be, is ``storescp.MoveListener``'s and ``pduguard.PduGuard``'s business.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from gateway.config import SourceConfig
from gateway.errors import GatewayError, SourceError, SourceTimeout
from gateway.redact import escape
from gateway.stream.dimse.associations import QUERIES, STUDY_GET, STUDY_MOVE, AssociationPool, refusal
from gateway.stream.dimse.pduguard import peer_name
from gateway.stream.dimse.replies import PENDING, Replies
from gateway.stream.dimse.storescp import MoveListener

__all__ = ["Retriever", "Uids"]

log = logging.getLogger("gateway.dimse")

# C-STORE statuses that refuse an instance. Not one we asked for (another instance, or ours carrying
# another study's or series' UIDs): "Refused: Not Authorized", a general status C-STORE may answer
# (PS3.7 9.1.1.1.9, C.5.21). A data set whose UIDs cannot be read: "Error: Cannot understand"
# (PS3.4 B.2.3, Table B.2-1).
_NOT_AUTHORIZED = 0x0124
_CANNOT_UNDERSTAND = 0xC000

Uids = tuple[str, str, "str | list[str]"]  # Study, Series, and one SOP Instance UID or a list


class Retriever:
    """The C-GETs and C-MOVEs of one source, and the Storage SCP its C-MOVEs send to."""

    def __init__(
        self,
        config: SourceConfig,
        associations: AssociationPool,
        replies: Replies,
        threads: Callable[[], ThreadPoolExecutor],
    ) -> None:
        self.name = config.name
        self.config = config
        self.deadlines = config.deadlines
        self._associations = associations
        self._replies = replies
        self._threads = threads
        self._lock = threading.Lock()
        self._moves: dict[str, _Retrieval] = {}  # C-MOVEs under way, by SOP Instance UID asked for
        self._scp: MoveListener | None = None  # the Storage SCP that receives C-MOVE sub-operations

    async def aiter_received(self, uids: Uids, sop_class: str | None) -> AsyncIterator[tuple[str, bytes]]:
        """Instances of one C-GET (or C-MOVE) as they arrive: each one asked for, as its SOP
        Instance UID and Part 10 bytes."""
        loop = asyncio.get_running_loop()
        received: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(2)

        def put(item: tuple[str, bytes] | None) -> None:  # worker thread: blocks while the client is slow
            asyncio.run_coroutine_threadsafe(received.put(item), loop).result(self.deadlines.total)

        operation = self._c_move if self.config.retrieve == "c-move" else self._c_get
        job = loop.run_in_executor(self._threads(), operation, _Retrieval(uids, put), sop_class)
        try:
            while True:
                waiter: asyncio.Future[Any] = asyncio.ensure_future(received.get())
                racing: set[asyncio.Future[Any]] = {waiter, job}
                done, _ = await asyncio.wait(
                    racing, timeout=self.deadlines.message, return_when=asyncio.FIRST_COMPLETED
                )
                if waiter in done:
                    item = waiter.result()
                    if item is None:
                        break
                    yield item
                    continue
                waiter.cancel()
                if job in done:
                    job.result()  # raises what the C-GET hit
                    break
                raise SourceTimeout(f"source {self.name}: no instance within {self.deadlines.message:g} s")
            await job
        finally:
            if not job.done():
                job.cancel()

    def _c_get(self, retrieval: _Retrieval, sop_class: str | None) -> None:
        with self._associations.acquire(sop_class) as assoc:

            def receive(event: Any) -> int:
                # Whatever is stored on this association during the C-GET is the PACS's answer to it.
                return self._received(event, lambda _: retrieval)

            assoc.gateway_sink["receive"] = receive  # type: ignore[attr-defined]
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = retrieval.uids
            deadline = time.monotonic() + self.deadlines.total
            final = None
            try:
                for status, _ in assoc.send_c_get(query, STUDY_GET):
                    self._replies.check_deadline(assoc, deadline, "C-GET")
                    if self._replies.status(status, "C-GET", deadline - self.deadlines.total) not in PENDING:
                        final = status
            except GatewayError as exc:
                self._refused("C-GET", retrieval, refusal(assoc), exc)
                raise
            # The PACS sent something else than what was asked: that is the error, whatever the
            # final status says of the sub-operations we refused.
            self._refused("C-GET", retrieval, refusal(assoc))
            self._replies.final(final, "C-GET")
        retrieval.put(None)

    def _c_move(self, retrieval: _Retrieval, sop_class: str | None) -> None:
        """C-MOVE to our own Storage SCP (for PACS without C-GET): the instances arrive on other
        associations, routed here by SOP Instance UID."""
        self._listener()
        with self._lock:
            for uid in retrieval.instances:
                self._moves[uid] = retrieval
        try:
            with self._associations.acquire(QUERIES) as assoc:
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = retrieval.uids
                deadline = time.monotonic() + self.deadlines.total
                final = None
                try:
                    for status, _ in assoc.send_c_move(query, self.config.calling_ae, STUDY_MOVE):
                        self._replies.check_deadline(assoc, deadline, "C-MOVE")
                        code = self._replies.status(status, "C-MOVE", deadline - self.deadlines.total)
                        if code not in PENDING:
                            final = status
                    self._replies.final(final, "C-MOVE")
                except SourceError as exc:
                    # Refusals alone do not fail a C-MOVE: anyone may have sent them, and the
                    # PACS's own copy may still come. When its sub-operations failed, they say why.
                    if type(exc) is SourceError:
                        self._refused("C-MOVE", retrieval, None, exc)
                    raise
        finally:
            with self._lock:
                for uid in retrieval.instances:
                    if self._moves.get(uid) is retrieval:
                        self._moves.pop(uid)
        retrieval.put(None)

    def _listener(self) -> MoveListener:
        with self._lock:
            if self._scp is None:
                listener = MoveListener(self.name, self.config, self._moved, self._awaited)
                listener.start()
                self._scp = listener
            return self._scp

    def _awaited(self, uid: str) -> bool:
        with self._lock:
            return uid in self._moves

    def _moved(self, event: Any) -> int:
        """A C-STORE on the Storage SCP: kept for the C-MOVE that asked for its instance, if any."""

        def lookup(uid: str) -> _Retrieval | None:
            with self._lock:
                return self._moves.get(uid)

        return self._received(event, lookup)

    def _received(self, event: Any, lookup: Callable[[str], _Retrieval | None]) -> int:
        """The status of a C-STORE that a retrieval brought (pynetdicom's thread): the instance
        goes to the retrieval (``lookup``, by SOP Instance UID) that asked for it, when its data
        set's own UIDs are the ones asked for; anything else is refused, named in the log with its
        sender, and noted on the retrieval it claimed to answer."""
        data = bytes(event.encoded_dataset(include_meta=True))
        command = str(event.request.AffectedSOPInstanceUID or "")
        own = _own_uids(data)
        sender = peer_name(event.assoc)
        retrieval = lookup(own[2] if own else command) or lookup(command)
        problem: str | None
        if own is None:
            problem = f"a C-STORE of {escape(command, 70)} whose data set's UIDs cannot be read"
            status = _CANNOT_UNDERSTAND
        else:
            problem, status = _mismatch(retrieval, command, own), _NOT_AUTHORIZED
            if retrieval is not None and problem is None:
                if retrieval.take(own[2]):
                    retrieval.put((own[2], data))
                    return 0x0000
                problem = f"instance {escape(own[2], 70)} came again"
        problem = problem or "not asked for"
        log.warning("source %s: refused an instance from %s: %s", self.name, sender, problem)
        if retrieval is not None and len(retrieval.refused) < 8:
            retrieval.refused.append(problem)
        return status

    def _refused(
        self, what: str, retrieval: _Retrieval, aborted: str | None, cause: Exception | None = None
    ) -> None:
        """Raise the error that says what the PACS sent instead of what was asked, if it did."""
        if aborted is not None:
            raise SourceError(f"source {self.name}: {what} aborted: the PACS sent {aborted}") from cause
        if retrieval.refused:
            raise SourceError(
                f"source {self.name}: {what} refused what came: {retrieval.refused[0]}"
            ) from cause

    def close(self) -> None:
        if self._scp is not None:
            self._scp.close()
            self._scp = None


class _Retrieval:
    """One C-GET or C-MOVE under way: what it asked for, where the instances it accepts go
    (``put``), and what was refused on its behalf."""

    def __init__(self, uids: Uids, put: Callable[[tuple[str, bytes] | None], None]) -> None:
        self.uids = uids
        self.study, self.series = uids[0], uids[1]
        self.instances = tuple(uids[2]) if isinstance(uids[2], list) else (uids[2],)
        self.put = put
        self.refused: list[str] = []
        self._pending = set(self.instances)
        self._lock = threading.Lock()

    def take(self, uid: str) -> bool:
        """Whether ``uid`` is still awaited (then no longer): each instance is accepted once."""
        with self._lock:
            if uid not in self._pending:
                return False
            self._pending.discard(uid)
            return True

    def asked(self) -> str:
        which = (
            f"instance {self.instances[0]}"
            if len(self.instances) == 1
            else f"{len(self.instances)} instances"
        )
        return f"{which} of study {self.study}, series {self.series}"


def _mismatch(retrieval: _Retrieval | None, command: str, own: tuple[str, str, str]) -> str | None:
    """Why an instance is not one ``retrieval`` asked for (None when it is): its data set's own
    Study, Series and SOP Instance UIDs must be the ones asked for, and the C-STORE's Affected SOP
    Instance UID (PS3.7 9.1.1.1.4), which pynetdicom writes into the Part 10 header as Media
    Storage SOP Instance UID, must name that same instance."""
    study, series, sop = (escape(uid, 70) for uid in own)
    received = f"instance {sop} of study {study}, series {series}"
    if command != own[2]:
        received += f" in a C-STORE of instance {escape(command, 70)}"
    if retrieval is None:
        return f"{received}: not asked for"
    if (
        command != own[2]
        or own[2] not in retrieval.instances
        or own[:2] != (retrieval.study, retrieval.series)
    ):
        return f"asked for {retrieval.asked()}, received {received}"
    return None


def _own_uids(data: bytes) -> tuple[str, str, str] | None:
    """The Study, Series and SOP Instance UIDs of the data set itself (not its Part 10 header)."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        )
        return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    except Exception:  # malformed, hostile or missing UIDs: refused
        return None
