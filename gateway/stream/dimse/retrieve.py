"""Retrieval from a DIMSE PACS: C-GET on our association, or C-MOVE to our own Storage SCP, and
what is accepted of what comes.

pynetdicom is threaded; each retrieval runs in a worker thread and hands every accepted instance
to the async caller through a bounded queue (``asyncio.Queue(2)``): a slow client slows the C-GET
instead of filling memory.

A consumer that stops reading (a viewer hanging up mid-series, a prefetch past its timeout, the
async generator closed or cancelled) stops the retrieval at once: its worker stops waiting on the
queue (it waits in ``_STEP`` steps and looks whether the consumer left), asks the PACS to stop with
a C-CANCEL (PS3.7 9.3.3.3 for C-GET, 9.3.4.3 for C-MOVE), refuses whatever still comes, and never
pools that association again: released when the PACS ended the operation with a final response
within the ``message`` deadline, aborted otherwise (an operation half done leaves the association
in a state nobody knows). One log line names the source, why, and what became of the association.
Without this, each abandoned retrieval held a worker thread and a pooled association for up to
the ``total`` deadline per remaining instance.

Received data must be what was asked for: each instance that comes (C-GET on our association,
C-MOVE on our Storage SCP) is kept only when its data set's own Study, Series and SOP Instance UIDs
are those of a retrieval under way, and its C-STORE names the same instance; anything else is
refused with a C-STORE failure status and never served, cached or learnt. A C-GET that brought
something else is an error naming what was asked and what came. Who may connect to the Storage SCP,
and how large an instance may be, is ``storescp.MoveListener``'s and ``pduguard.PduGuard``'s business.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom.association import Association

from gateway.config import SourceConfig
from gateway.errors import GatewayError, SourceError, SourceTimeout
from gateway.redact import escape
from gateway.stream.dimse.associations import (
    QUERIES,
    STUDY_GET,
    STUDY_MOVE,
    AssociationPool,
    refusal,
    retire,
)
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
# An instance of a retrieval whose consumer left: "Refused: Out of Resources" (PS3.4 B.2.3), as
# the pool answers a C-STORE on an association that expects none: no one would keep it.
_UNWANTED = 0xA700
# The Message ID of our C-GET and C-MOVE requests, which a C-CANCEL names (PS3.7 9.3.3.3, 9.3.4.3):
# one operation at a time per association.
_MESSAGE_ID = 1
_STEP = 0.05  # seconds a worker waits on a full queue before it looks again whether the consumer left

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
        self._running = 0  # worker threads under way

    async def aiter_received(self, uids: Uids, sop_class: str | None) -> AsyncIterator[tuple[str, bytes]]:
        """Instances of one C-GET (or C-MOVE) as they arrive: each one asked for, as its SOP
        Instance UID and Part 10 bytes."""
        loop = asyncio.get_running_loop()
        received: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(2)
        total = self.deadlines.total
        # Worker thread: waits while the consumer is slow, gives up when it left.
        retrieval = _Retrieval(uids, lambda item: handoff(loop, received, item, retrieval, total))
        operation = self._c_move if self.config.retrieve == "c-move" else self._c_get
        job = loop.run_in_executor(self._threads(), self._run, operation, retrieval, sop_class)
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
                retrieval.stop(f"no instance came within {self.deadlines.message:g} s")
                raise SourceTimeout(f"source {self.name}: no instance within {self.deadlines.message:g} s")
            await job
        finally:
            if not job.done():
                # The consumer left (closed, cancelled, or past a deadline): the worker stops now,
                # not after waiting ``total`` on each instance still to come.
                retrieval.stop("the consumer stopped reading")
                job.add_done_callback(self._left_behind)

    def _left_behind(self, job: asyncio.Future[None]) -> None:
        """What a retrieval nobody waits for any more ended with: logged by ``_stopped`` already,
        unless it is not one of ours."""
        if not job.cancelled() and not isinstance(job.exception(), GatewayError | None):
            log.error("source %s: a stopped retrieval failed", self.name, exc_info=job.exception())

    def _run(
        self,
        operation: Callable[[_Retrieval, str | None], None],
        retrieval: _Retrieval,
        sop_class: str | None,
    ) -> None:
        with self._lock:
            self._running += 1
        try:
            operation(retrieval, sop_class)
        finally:
            with self._lock:
                self._running -= 1

    def running(self) -> int:
        """How many retrievals have a worker thread now."""
        with self._lock:
            return self._running

    def _c_get(self, retrieval: _Retrieval, sop_class: str | None) -> None:
        with self._associations.acquire(sop_class) as assoc:

            def receive(event: Any) -> int:
                # Whatever is stored on this association during the C-GET is the PACS's answer to it.
                status = self._received(event, lambda _: retrieval)
                self._stopping(assoc, retrieval, STUDY_GET)  # a C-STORE: the C-GET is under way
                return status

            assoc.gateway_sink["receive"] = receive  # type: ignore[attr-defined]
            final = None
            try:
                responses = assoc.send_c_get(_query(retrieval), STUDY_GET, msg_id=_MESSAGE_ID)
                final = self._final(assoc, retrieval, responses, "C-GET", STUDY_GET)
            except GatewayError as exc:
                if retrieval.stopped.is_set():
                    self._stopped("C-GET", retrieval, assoc, None, exc)
                self._refused("C-GET", retrieval, refusal(assoc), exc)
                raise
            if retrieval.stopped.is_set():
                self._stopped("C-GET", retrieval, assoc, final)
            # The PACS sent something else than what was asked: that is the error, whatever the
            # final status says of the sub-operations we refused.
            self._refused("C-GET", retrieval, refusal(assoc))
            self._replies.final(final, "C-GET")
        if not retrieval.put(None):
            self._stopped("C-GET", retrieval, None, final)

    def _final(
        self, assoc: Association, retrieval: _Retrieval, responses: Any, what: str, model: str
    ) -> Dataset | None:
        """Read a C-GET's or C-MOVE's responses (each within the deadlines) up to its final one,
        returned (None when the association ended first). Once the consumer left, each response
        may call for the C-CANCEL or the abort (``_after_stop``) instead."""
        deadline = time.monotonic() + self.deadlines.total
        final = None
        for status, _ in responses:
            if retrieval.stopped.is_set():
                final = self._after_stop(assoc, retrieval, status, model)
                if final is not None or not assoc.is_established:
                    break
                continue
            self._replies.check_deadline(assoc, deadline, what)
            if self._replies.status(status, what, deadline - self.deadlines.total) not in PENDING:
                final = status
        return final

    def _stopping(self, assoc: Association, retrieval: _Retrieval, model: str) -> None:
        """Once the consumer left: ask the PACS once to stop the operation (C-CANCEL, PS3.7
        9.3.3.3 for C-GET, 9.3.4.3 for C-MOVE), and abort the association when it has not ended
        the operation within the ``message`` deadline since. Called while the operation is under
        way only (a pending response, a C-STORE): a C-CANCEL for an ended one would be stray."""
        if not retrieval.stopped.is_set() or not assoc.is_established:
            return
        now = time.monotonic()
        if retrieval.cancelled is None:
            retrieval.cancelled = now
            # Even ended by the PACS, a cancelled operation's association is released, not pooled:
            # a PACS's cancel path is its least tried. Measured with DCMTK's dcmqrscp (3.6.7): after
            # a cancelled C-GET, C-GETs on its other associations got no answer until this one ended.
            retire(assoc)
            try:
                assoc.send_c_cancel(_MESSAGE_ID, query_model=model)
            except (RuntimeError, ValueError):  # the association ended meanwhile
                pass
        elif now - retrieval.cancelled > self.deadlines.message:
            retrieval.aborted = True
            assoc.abort()
            # Our own abort does not wake pynetdicom's wait for the next message (its DUL does so
            # on the peer's abort only): wake it, so the worker ends now, not a ``message`` later.
            assoc.dimse.msg_queue.put((None, None))

    def _after_stop(
        self, assoc: Association, retrieval: _Retrieval, status: Dataset, model: str
    ) -> Dataset | None:
        """A response after the consumer left: the final one (any status: Cancel, FE00, is the
        expected one), or a pending one, which may call for the C-CANCEL or the abort."""
        if status and "Status" in status and int(status.Status) not in PENDING:
            return status
        self._stopping(assoc, retrieval, model)
        return None

    def _stopped(
        self,
        what: str,
        retrieval: _Retrieval,
        assoc: Association | None,
        final: Dataset | None,
        cause: Exception | None = None,
    ) -> None:
        """Log, in one line, why a retrieval stopped and what became of its association, and end
        its worker with an error (which only a consumer past ``total`` would still read)."""
        if assoc is None:
            outcome = "it had ended"
        elif final is not None:
            status = int(final.Status)
            after = "released" if retrieval.cancelled is not None else "reusable"
            outcome = f"the PACS ended it with status {status:04X}: association {after}"
        elif retrieval.aborted:
            outcome = (
                f"the PACS did not end it within {self.deadlines.message:g} s of a C-CANCEL: "
                "association aborted"
            )
        else:
            outcome = "the association ended without a final response: not reused"
        log.info(
            "source %s: %s of %s stopped after %d instance(s), %d refused since: %s; %s",
            self.name,
            what,
            retrieval.asked(),
            retrieval.delivered,
            retrieval.unwanted,
            retrieval.why,
            outcome,
        )
        raise SourceTimeout(f"source {self.name}: {what} stopped: {retrieval.why}") from cause

    def _c_move(self, retrieval: _Retrieval, sop_class: str | None) -> None:
        """C-MOVE to our own Storage SCP (for PACS without C-GET): the instances arrive on other
        associations, routed here by SOP Instance UID."""
        self._listener()
        with self._lock:
            for uid in retrieval.instances:
                self._moves[uid] = retrieval
        try:
            with self._associations.acquire(QUERIES) as assoc:
                final = None
                try:
                    moves = assoc.send_c_move(
                        _query(retrieval), self.config.calling_ae, STUDY_MOVE, msg_id=_MESSAGE_ID
                    )
                    final = self._final(assoc, retrieval, moves, "C-MOVE", STUDY_MOVE)
                    if retrieval.stopped.is_set():
                        self._stopped("C-MOVE", retrieval, assoc, final)
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
        if not retrieval.put(None):
            self._stopped("C-MOVE", retrieval, None, final)

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
        sender, and noted on the retrieval it claimed to answer. A retrieval whose consumer left
        refuses all that still comes for it, unread, and counts it (its one log line says so)."""
        command = str(event.request.AffectedSOPInstanceUID or "")
        stopped = lookup(command)
        if stopped is not None and stopped.stopped.is_set():
            stopped.unwanted += 1
            return _UNWANTED
        data = bytes(event.encoded_dataset(include_meta=True))
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
                    if retrieval.put((own[2], data)):
                        retrieval.delivered += 1
                        return 0x0000
                    retrieval.unwanted += 1  # the consumer left while it waited: no one keeps it
                    return _UNWANTED
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
    (``put``: False when they can no longer go anywhere), what was refused on its behalf, and
    whether its consumer left (``stopped``, and why)."""

    def __init__(self, uids: Uids, put: Callable[[tuple[str, bytes] | None], bool]) -> None:
        self.uids = uids
        self.study, self.series = uids[0], uids[1]
        self.instances = tuple(uids[2]) if isinstance(uids[2], list) else (uids[2],)
        self.put = put
        self.refused: list[str] = []
        self.stopped = threading.Event()
        self.why = ""
        self.cancelled: float | None = None  # when the C-CANCEL was sent (monotonic)
        self.aborted = False  # the association was aborted: the PACS did not end the operation
        self.delivered = 0  # instances handed to the consumer
        self.unwanted = 0  # instances refused because the consumer had left
        self._pending = set(self.instances)
        self._lock = threading.Lock()

    def stop(self, why: str) -> None:
        """The consumer left: the worker stops waiting, refuses what comes, cancels the operation."""
        with self._lock:
            if not self.stopped.is_set():
                self.why = why
                self.stopped.set()

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


def handoff(
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[Any],
    item: Any,
    retrieval: _Retrieval,
    total: float,
) -> bool:
    """Put ``item`` on the consumer's bounded ``queue`` (from a worker thread), waiting while the
    consumer is slow, up to ``total`` seconds, in ``_STEP`` steps so that a consumer that left is
    noticed at once. False, and the retrieval stopped, when nobody takes it: the consumer left
    (``retrieval.stopped``, or its loop closed) or did not read for ``total`` seconds."""
    if retrieval.stopped.is_set():
        return False
    try:
        future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
    except RuntimeError:  # the consumer's event loop is closed
        retrieval.stop("the consumer's event loop closed")
        return False
    deadline = time.monotonic() + total
    while True:
        try:
            future.result(_STEP)
            return True
        except concurrent.futures.CancelledError:  # the loop cancelled the put: it is shutting down
            retrieval.stop("the consumer's event loop closed")
            return False
        except TimeoutError:
            if time.monotonic() > deadline:
                retrieval.stop(f"the consumer read nothing for {total:g} s")
            if retrieval.stopped.is_set():
                future.cancel()
                return False


def _query(retrieval: _Retrieval) -> Dataset:
    """The identifier of a C-GET or C-MOVE of ``retrieval``'s instances (PS3.4 C.4.2.2.1, C.4.3.2.1)."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = retrieval.uids
    return query


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
