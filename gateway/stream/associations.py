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

What a peer sends is bounded before it is buffered (``PduGuard``, on every association, ours and the
PACS's): pynetdicom reads a whole PDU of whatever length its header announces, and reassembles a
DIMSE message of any size in memory. ``MoveListener`` is the Storage SCP a C-MOVE's sub-operations
come to; it accepts associations from the configured PACS only (its address, its AE title).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import StoragePresentationContexts

from gateway.config import SourceConfig
from gateway.errors import SourceTimeout, SourceUnavailable
from gateway.redact import escape

__all__ = [
    "AssociationPool",
    "MoveListener",
    "PduGuard",
    "guard_association",
    "listen_host",
    "pacs_addresses",
    "peer_name",
    "refusal",
    "QUERIES",
    "VERIFICATION",
    "STUDY_FIND",
    "STUDY_GET",
    "STUDY_MOVE",
    "affected_instance",
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
        try:
            yield assoc
        finally:
            assoc.gateway_sink["receive"] = None  # type: ignore[attr-defined]
            with self._lock:
                idle = self._idle.setdefault(sop_class, [])
                if assoc.is_established and len(idle) < _POOL:
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


def refusal(assoc: Association) -> str | None:
    """Why the guard of ``assoc`` aborted it, if it did."""
    guard = getattr(assoc, "gateway_guard", None)
    return guard.refused if guard is not None else None


# -- what a peer may send: bounded before it is read -----------------------------------------------
# pynetdicom reads a whole PDU of whatever length its header announces (DULServiceProvider.
# _read_pdu_data) and tells handlers only after that (EVT_DATA_RECV); it reassembles a message's
# data set in memory, or with _config.STORE_RECV_CHUNKED_DATASET in a temporary file (patient data
# on disk, for every association of the process, and the disk fills instead). The maximum PDU length
# we announce (PS3.8 D.1) binds a well-behaved peer only. So PDU headers are read here, as they
# come off the socket, and what they announce is refused before it is read.
_P_DATA_TF = 0x04  # PDU type (PS3.8 9.3.1)
# The longest PDU read: 64 times the P-DATA length we announce (pynetdicom's 16,382 bytes) and 20
# times an A-ASSOCIATE-RQ with 128 presentation contexts of 13 transfer syntaxes each.
_MAX_PDU = 1024 * 1024
_MAX_COMMAND = 64 * 1024  # a command set (PS3.7 9.3, E.1) takes a few hundred bytes
# The most read of a C-STORE for an instance no retrieval awaits: room for a small one to be read
# and refused with a status (the PACS then goes on with the next), not for a large one.
_UNASKED_BYTES = 1024 * 1024
# A-ABORT PDU (PS3.8 9.3.8): source 0, the service-user (this gateway) aborts; reason 0.
_A_ABORT = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0))


class PduGuard:
    """What a peer sends, counted from the reads pynetdicom makes: a 6-byte PDU header (type,
    reserved, length: PS3.8 9.3.1), then that PDU's body. A P-DATA-TF body is PDV items (PS3.8
    9.3.5.1: 4-byte length, presentation context ID, message control header, fragment) whose control
    header says command or data set, and last fragment or not (PS3.8 E.2).

    ``feed`` returns False for a header that announces more than allowed (a PDU longer than
    ``_MAX_PDU``, a data set that would pass ``limit`` bytes, a command set past ``_MAX_COMMAND``),
    and from then on: that PDU's body is never read, so memory holds at most ``limit`` bytes of one
    message however long the peer goes on. With ``awaited``, the data set of a C-STORE whose command
    names an instance that ``awaited`` says no retrieval waits for gets ``_UNASKED_BYTES`` only: a
    small one is read and refused with a status, a large one is not read. No socket here."""

    def __init__(self, limit: int, awaited: Callable[[str], bool] | None = None) -> None:
        self.limit = limit
        self.awaited = awaited
        self.refused: str | None = None
        self.dataset = 0  # bytes of the data set under way
        self.largest = 0  # the largest data set let through
        self._budget = limit  # what the data set under way may reach
        self._unasked: str | None = None  # the instance it claims to be, when nobody awaits it
        self._command = bytearray()  # the command set under way
        self._body: int | None = None  # the type of the PDU whose body is read next

    def refuse(self, reason: str) -> None:
        if self.refused is None:
            self.refused = reason

    def feed(self, data: bytes | bytearray) -> bool:
        if self.refused is not None:
            return False
        if self._body is not None:
            if self._body == _P_DATA_TF:
                self._pdvs(data)
            self._body = None
            return True
        if len(data) != 6:
            return True  # the connection closed mid-header: pynetdicom sees it and ends
        kind, _, length = struct.unpack(">BBL", data)
        if length > _MAX_PDU:
            self.refuse(f"a PDU of {length} bytes, more than the {_MAX_PDU} accepted")
        elif kind == _P_DATA_TF and self.dataset + length > self._budget and self._unasked is not None:
            self.refuse(
                f"an instance no retrieval awaits ({self._unasked}) of more than {self._budget} bytes"
            )
        elif kind == _P_DATA_TF and self.dataset + length > self._budget:
            self.refuse(f"an instance of more than {self.limit} bytes (max_instance_bytes)")
        elif len(self._command) > _MAX_COMMAND:
            self.refuse(f"a command set of more than {_MAX_COMMAND} bytes")
        else:
            self._body = kind
            return True
        return False

    def _pdvs(self, body: bytes | bytearray) -> None:
        offset = 0
        while offset + 6 <= len(body):
            (length,) = struct.unpack_from(">L", body, offset)
            control, fragment = body[offset + 5], body[offset + 6 : offset + 4 + length]
            if control & 1:
                self._command += fragment
                if control & 2:
                    self._commanded(bytes(self._command))
                    self._command.clear()
            else:
                self.dataset += len(fragment)
                self.largest = max(self.largest, self.dataset)
                if control & 2:
                    self.dataset, self._budget, self._unasked = 0, self.limit, None
            offset += 4 + length

    def _commanded(self, command: bytes) -> None:
        uid = affected_instance(command)
        if uid is not None and self.awaited is not None and not self.awaited(uid):
            self._budget, self._unasked = min(self.limit, _UNASKED_BYTES), escape(uid, 70)


def affected_instance(command: bytes) -> str | None:
    """The Affected SOP Instance UID of a C-STORE-RQ command set (PS3.7 9.3.1.1; encoded implicit
    VR little endian, PS3.7 6.3.1), None for any other command or one that cannot be read."""
    offset, field, uid = 0, None, None
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, offset)
        value = command[offset + 8 : offset + 8 + length]
        if (group, element) == (0x0000, 0x0100) and len(value) == 2:
            (field,) = struct.unpack("<H", value)
        elif (group, element) == (0x0000, 0x1000):
            uid = value.decode("ascii", "replace").rstrip("\0 ")
        offset += 8 + length
    return uid if field == 0x0001 else None


def guard_association(
    assoc: Association, name: str, limit: int, awaited: Callable[[str], bool] | None = None
) -> PduGuard:
    """Put a ``PduGuard`` between ``assoc``'s socket and pynetdicom's reader; call it when the
    connection opens (EVT_CONN_OPEN), before the first PDU. Once it refuses, nothing more is read:
    the peer gets an A-ABORT, and pynetdicom, handed no bytes, sees the connection closed (PS3.8
    Evt17) and ends the association."""
    guard = PduGuard(limit, awaited)
    sock = assoc.dul.socket
    assert sock is not None
    recv = sock.recv
    aborted: list[bool] = []

    def guarded(nr_bytes: int) -> bytearray:
        if guard.refused is None:
            data = recv(nr_bytes)
            if guard.feed(data):
                return data
        if not aborted:
            aborted.append(True)
            log.warning(
                "source %s: aborted the association with %s: %s", name, peer_name(assoc), guard.refused
            )
            with contextlib.suppress(OSError, AttributeError):
                sock.socket.sendall(_A_ABORT)  # type: ignore[union-attr]
        return bytearray()

    sock.recv = guarded  # type: ignore[method-assign]
    assoc.gateway_guard = guard  # type: ignore[attr-defined]
    return guard


def peer_name(assoc: Association) -> str:
    """The other end of ``assoc``, for a log line: its address, and its AE title once known."""
    remote = assoc.remote
    title = str(remote.get("ae_title") or "").strip()
    where = f"{remote.get('address')}:{remote.get('port')}"
    return f"{where} as {escape(title, 16)!r}" if title else where


# -- the C-MOVE destination -----------------------------------------------------------------------
_RESOLVE_EVERY = 60.0  # seconds before the PACS's host name is resolved again for an unknown peer


class MoveListener:
    """The Storage SCP that a C-MOVE's sub-operations come to: the PACS opens associations to
    the move destination and sends C-STOREs on them (PS3.4 C.4.2.3). Anyone who reaches its port
    could send, so it accepts associations from the configured PACS only:

    - from an address its ``host`` resolves to, checked when the connection opens: nothing is
      read from anyone else;
    - calling as ``move_source_ae`` (default ``called_ae``, the title the PACS answers to) and
      calling us as ``calling_ae``: A-ASSOCIATE-RJ otherwise (PS3.8 9.3.4, reasons 3 and 7);
    - within ``max_instance_bytes`` per instance, and ``_UNASKED_BYTES`` for a C-STORE whose
      command names an instance that ``awaited`` says no retrieval waits for (``PduGuard``).

    AE titles are not credentials and addresses on a shared network can be spoofed: these checks
    narrow who can send; what is kept is decided per C-STORE by ``store``, which answers its
    status (the retrievals under way check the instance's own UIDs)."""

    def __init__(
        self,
        name: str,
        config: SourceConfig,
        store: Callable[[Any], int],
        awaited: Callable[[str], bool] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.source_ae = config.move_source_ae or config.called_ae
        self._store = store
        self._awaited = awaited
        self._allowed: frozenset[str] = frozenset()
        self._resolved = -_RESOLVE_EVERY
        self._lock = threading.Lock()
        self._server: Any = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        host = listen_host(self.name, self.config)
        port = self.config.move_destination_port or 0
        ae = AE(ae_title=self.config.calling_ae)
        ae.acse_timeout = self.config.deadlines.connect
        ae.dimse_timeout = self.config.deadlines.message
        # A connection that goes quiet is dropped: it holds one of the few association slots.
        ae.network_timeout = self.config.deadlines.message
        ae.require_calling_aet = [self.source_ae]
        ae.require_called_aet = True
        for storage in STORAGE:
            ae.add_supported_context(storage, SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_C_STORE, self._store),
        ]
        try:
            self._server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise SourceUnavailable(
                f"source {self.name}: cannot listen for C-MOVE on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        log.info(
            "source %s: C-MOVE destination %s listening on %s:%d for %s at %s",
            self.name,
            self.config.calling_ae,
            *self.address,
            self.source_ae,
            self.config.host,
        )

    def accepts(self, address: str) -> bool:
        """Whether a connection from ``address`` may come from the PACS: an address its host
        resolves to (resolved again, at most once a minute, when a peer is not one of them)."""
        peer = _normalized(address)
        with self._lock:
            if peer in self._allowed:
                return True
            if time.monotonic() - self._resolved < _RESOLVE_EVERY:
                return False
            self._resolved = time.monotonic()
            try:
                self._allowed = pacs_addresses(self.config.host or "")
            except OSError as exc:
                log.warning("source %s: cannot resolve %s: %s", self.name, self.config.host, exc)
            return peer in self._allowed

    def _opened(self, event: Any) -> None:
        guard = guard_association(event.assoc, self.name, self.config.max_instance_bytes, self._awaited)
        if not self.accepts(str(event.address[0])):
            guard.refuse(f"not an address of the PACS ({self.config.host})")

    def _rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        called = str(getattr(requestor.primitive, "called_ae_title", "")).strip()
        titles = (str(requestor.ae_title).strip(), called)
        why = (
            f"only {self.source_ae!r} may send to {self.config.calling_ae!r}"
            if titles != (self.source_ae, self.config.calling_ae)
            else "more associations at once than it serves"
        )
        log.warning(
            "source %s: rejected an association from %s calling %r: %s",
            self.name,
            peer_name(event.assoc),
            escape(called, 16),
            why,
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def listen_host(name: str, config: SourceConfig) -> str:
    """Where the C-MOVE destination listens: ``move_listen_host``, else the local address this
    machine reaches the PACS from (loopback for a PACS on this machine), the network the PACS
    connects back on. Never every interface by default: any network the machine is on could
    reach it."""
    if config.move_listen_host:
        return config.move_listen_host
    if config.host == "localhost":
        return "127.0.0.1"
    try:
        routes = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise SourceUnavailable(f"source {name}: cannot resolve {config.host}: {exc}") from exc
    for family, kind, proto, _, address in routes:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.connect(address)  # UDP: chooses the route and its source address, sends nothing
            except OSError:
                continue
            return str(probe.getsockname()[0])
    raise SourceUnavailable(
        f"source {name}: no route to {config.host} to listen for C-MOVE on; set move_listen_host"
    )


def pacs_addresses(host: str) -> frozenset[str]:
    """The addresses ``host`` resolves to (raises OSError when it does not)."""
    found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return frozenset(_normalized(str(address[0])) for *_, address in found)


def _normalized(address: str) -> str:
    """One spelling per address: no IPv6 zone, IPv4-mapped IPv6 (a dual-stack socket) as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
