"""Associations with one DIMSE PACS: a small pool per SOP class, set up for C-GET.

An association for queries proposes the storage SOP classes with every syntax in one context each;
one for retrieving a known SOP class proposes that class once per transfer syntax, because the PACS
accepts one syntax per context and must find the one the instance is stored in (or transcode, or
fail). Idle associations are kept for ``_IDLE`` seconds: PACS drop idle ones, and finding out in the
middle of a request costs the request.

An idle pynetdicom association is not free: its two threads poll every millisecond. Measured here
against Orthanc, a C-FIND of 500 instances took 0.24 s beside no idle association and 3.2 s beside
16 (2 s of this process's CPU spent polling). Pooled associations are therefore parked: their
reactor paused and their socket polled every ``_PARKED_POLL`` seconds, and retired by a timer after
``_IDLE`` seconds even when no request comes to take them. A PACS has few association slots too
(Orthanc serves 4 at once by default): an association kept idle is one another caller cannot use.

What a peer sends is bounded before it is buffered (``pduguard``, on every association, ours and the
PACS's): pynetdicom reads a whole PDU of whatever length its header announces, and reassembles a
DIMSE message of any size in memory. The Storage SCP a C-MOVE's sub-operations come to is
``storescp.MoveListener``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import StoragePresentationContexts

from gateway.config import SourceConfig
from gateway.errors import SourceTimeout, SourceUnavailable
from gateway.stream.dimse.pduguard import guard_association

__all__ = [
    "AssociationPool",
    "refusal",
    "retire",
    "QUERIES",
    "VERIFICATION",
    "STUDY_FIND",
    "STUDY_GET",
    "STUDY_MOVE",
    "STORAGE",
    "SYNTAXES",
]

# SOP classes (PS3.4 Annex A and C.4): Verification, Study Root Query/Retrieve FIND, GET, MOVE.
VERIFICATION = "1.2.840.10008.1.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
log = logging.getLogger("gateway.dimse")

QUERIES = "queries"  # the pool key of associations for C-ECHO, C-FIND and C-MOVE only
_POOL = 4  # idle associations kept per source
_IDLE = 20.0  # seconds an idle association is kept
_PARKED_POLL = 0.02  # seconds between socket polls of a parked association (pynetdicom: 0.001)
# Transfer syntaxes accepted for received instances: as stored, no transcoding by the PACS.
SYNTAXES = [
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
]
# At most 128 presentation contexts per association (PS3.8 9.3.2.2): 4 for the services above.
STORAGE = [str(context.abstract_syntax) for context in StoragePresentationContexts][: 128 - 4]


class AssociationPool:
    def __init__(self, name: str, config: SourceConfig) -> None:
        self.name = name
        self.config = config
        self.deadlines = config.deadlines
        self._idle: dict[str | None, list[tuple[Association, float]]] = {}
        self._lock = threading.Lock()
        self._reaper: threading.Timer | None = None
        self._busy = 0  # associations lent out now
        self._discarded = 0  # associations that came back aborted or retired (never pooled), ever

    def ae(self) -> AE:
        ae = AE(ae_title=self.config.calling_ae)
        ae.acse_timeout = self.deadlines.connect
        ae.connection_timeout = self.deadlines.connect
        ae.dimse_timeout = self.deadlines.message
        # No network_timeout: it would abort pooled associations while idle (logging an error);
        # replies are bounded by dimse_timeout, and idle associations are retired by the pool.
        ae.network_timeout = None
        return ae

    def _contexts(self, sop_class: str | None) -> list[Any]:
        if sop_class == QUERIES:
            # Nothing comes back on it but identifiers and statuses: proposing every storage class
            # with every syntax (1,600 items) made the association request take ~90 ms.
            return [build_context(model) for model in (VERIFICATION, STUDY_FIND, STUDY_MOVE)]
        contexts = [build_context(model) for model in (VERIFICATION, STUDY_FIND, STUDY_GET, STUDY_MOVE)]
        if sop_class is None:
            return contexts + [build_context(storage, SYNTAXES) for storage in STORAGE]
        # One context per transfer syntax: the PACS accepts one syntax per context, and must find
        # the one the instance is stored in, or it would have to transcode (or fail to send it).
        return contexts + [build_context(sop_class, syntax) for syntax in SYNTAXES]

    def _associate(self, sop_class: str | None) -> Association:
        # C-GET sends the instances back on this association: we take the SCP role for storage.
        classes = [] if sop_class == QUERIES else STORAGE if sop_class is None else [sop_class]
        roles: list[Any] = [build_role(storage, scp_role=True) for storage in classes]
        # The retrieval under way checks what comes and answers the C-STORE's status.
        sink: dict[str, Any] = {"receive": None}

        def on_store(event: Any) -> int:
            receive = sink["receive"]
            if receive is None:
                return 0xA700  # not expecting instances on this association
            return int(receive(event))

        def on_open(event: Any) -> None:
            guard_association(event.assoc, self.name, self.config.max_instance_bytes)

        started = time.monotonic()
        assoc = self.ae().associate(
            self.config.host or "",
            self.config.port,
            contexts=self._contexts(sop_class),
            ae_title=self.config.called_ae,
            ext_neg=roles,
            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)],
        )
        if not assoc.is_established and time.monotonic() - started >= self.deadlines.connect * 0.9:
            raise SourceTimeout(
                f"source {self.name}: {self.config.host}:{self.config.port} did not answer the association "
                f"request within the deadline ({self.deadlines.connect:g} s)"
            )
        if not assoc.is_established:
            what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise SourceUnavailable(
                f"source {self.name}: association with {self.config.called_ae} at "
                f"{self.config.host}:{self.config.port} {what}"
            )
        assoc.gateway_sink = sink  # type: ignore[attr-defined]
        return assoc

    @contextlib.contextmanager
    def acquire(self, sop_class: str | None = None) -> Iterator[Association]:
        """An association from the pool: one pool per SOP class retrieved by C-GET, one for C-GET
        of any class (``None``), one for ``QUERIES``."""
        with self._lock:
            idle = self._idle.setdefault(sop_class, [])
            assoc, since = idle.pop() if idle else (None, 0.0)
        if assoc is not None:
            _unpark(assoc)
            if not _usable(assoc):
                assoc.abort()  # the peer dropped it while it was idle
                assoc = None
            elif time.monotonic() - since > _IDLE:
                assoc.release()  # PACS drop idle associations; do not find out mid-request
                assoc = None
        if assoc is None:
            assoc = self._associate(sop_class)
        with self._lock:
            self._busy += 1
        try:
            yield assoc
        finally:
            assoc.gateway_sink["receive"] = None  # type: ignore[attr-defined]
            with self._lock:
                self._busy -= 1
                retired = getattr(assoc, "gateway_retired", False)
                self._discarded += retired or not assoc.is_established
                idle = self._idle.setdefault(sop_class, [])
                if assoc.is_established and not retired and len(idle) < _POOL:
                    _park(assoc)
                    idle.append((assoc, time.monotonic()))
                    assoc = None  # type: ignore[assignment]
                    self._schedule_reaper()
            if assoc is not None and assoc.is_established:
                assoc.release()

    def _schedule_reaper(self) -> None:
        # Called with the lock held. One timer at a time; it re-arms itself while any are idle.
        if self._reaper is None:
            self._reaper = threading.Timer(_IDLE / 2, self._reap)
            self._reaper.daemon = True
            self._reaper.start()

    def _reap(self) -> None:
        now = time.monotonic()
        expired = []
        with self._lock:
            self._reaper = None
            for idle in self._idle.values():
                expired += [assoc for assoc, since in idle if now - since > _IDLE]
                idle[:] = [(assoc, since) for assoc, since in idle if now - since <= _IDLE]
            if any(self._idle.values()):
                self._schedule_reaper()
        for assoc in expired:
            _unpark(assoc)
            _end(assoc)

    def idle_count(self) -> int:
        with self._lock:
            return sum(len(idle) for idle in self._idle.values())

    def busy_count(self) -> int:
        """Associations lent out now, to an operation under way."""
        with self._lock:
            return self._busy

    def discarded_count(self) -> int:
        """Associations that came back aborted or ``retire``d, so not pooled, since the pool began."""
        with self._lock:
            return self._discarded

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
            if self._reaper is not None:
                self._reaper.cancel()
                self._reaper = None
        for pool in pools.values():
            for assoc, _ in pool:
                _unpark(assoc)
                _end(assoc)


# Parking uses two of pynetdicom's private attributes (Association._reactor_checkpoint, the event
# its own send_*() methods clear to pause the reactor, and DULServiceProvider._run_loop_delay);
# without them (another pynetdicom) associations are pooled unparked, as before.
def _park(assoc: Association) -> None:
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc.dul, "_run_loop_delay"):
        return
    checkpoint.clear()
    deadline = time.monotonic() + 0.1
    while not getattr(assoc, "_is_paused", True) and time.monotonic() < deadline:
        time.sleep(0.0001)  # the reactor pauses within one of its 1 ms loops
    assoc.gateway_poll = assoc.dul._run_loop_delay  # type: ignore[attr-defined]
    assoc.dul._run_loop_delay = _PARKED_POLL


def _unpark(assoc: Association) -> None:
    poll = getattr(assoc, "gateway_poll", None)
    if poll is not None:
        assoc.dul._run_loop_delay = poll
        assoc._reactor_checkpoint.set()


def _usable(assoc: Association) -> bool:
    """Established, and the peer has neither released nor aborted it: a parked association's
    reactor has not looked, so look at what its reactor would (pynetdicom Association._run_reactor)."""
    if not assoc.is_established or not assoc.dul.is_alive():
        return False
    return not (assoc.acse.is_aborted() or assoc.acse.is_release_requested())


def _end(assoc: Association) -> None:
    """Release an association taken out of the pool; abort one the peer already dropped."""
    if _usable(assoc):
        assoc.release()
    else:
        assoc.abort()


def retire(assoc: Association) -> None:
    """Never pool ``assoc`` again: it is released when given back (or aborted before)."""
    assoc.gateway_retired = True  # type: ignore[attr-defined]


def refusal(assoc: Association) -> str | None:
    """Why the guard of ``assoc`` aborted it, if it did."""
    guard = getattr(assoc, "gateway_guard", None)
    return guard.refused if guard is not None else None
