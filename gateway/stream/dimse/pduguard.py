"""What a DIMSE peer may send, bounded before it is read: a guard between an association's socket
and pynetdicom's reader, on every association (the gateway's own to a PACS, and the PACS's to the
C-MOVE Storage SCP).
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Callable

from pynetdicom.association import Association

from gateway.redact import escape

__all__ = ["PduGuard", "affected_instance", "guard_association", "peer_name", "UNASKED_BYTES"]

log = logging.getLogger("gateway.dimse")

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
UNASKED_BYTES = 1024 * 1024
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
    names an instance that ``awaited`` says no retrieval waits for gets ``UNASKED_BYTES`` only: a
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
            self._budget, self._unasked = min(self.limit, UNASKED_BYTES), escape(uid, 70)


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
