"""The Instance Availability Notification SCP (PS3.4 Annex R): a PACS that sends notifications
(dcm4chee does; Orthanc and DCMTK do not) tells the gateway at once which study has new instances,
and the source's watcher turns each into the paths to harvest then (``DimseSource.watch``), the
periodic C-FIND kept as the safety net.

It listens on its own port, ``ian_port``, not the C-MOVE destination's: that Storage SCP is started
on a source's first C-MOVE and only for sources that retrieve by C-MOVE, and it takes instances of
up to ``max_instance_bytes``; this one runs for as long as the source is watched, whatever its
retrieval, and takes notifications of a few kilobytes (``MAX_NOTICE_BYTES``). Who may connect is
decided as for the C-MOVE destination (``storescp.MoveListener``, reused): an address the PACS's
host resolves to, calling as the PACS's AE title (``called_ae`` or ``move_source_ae``) and calling
us as ``calling_ae``, each PDU bounded before it is read (``pduguard``).

The gateway answers an N-CREATE once the hint is queued, not after the harvest (its status says
the notification was taken, PS3.4 R.3); the watcher's thread hands what is queued to the harvest schedule.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from gateway.config import SourceConfig
from gateway.errors import SourceError, SourceUnavailable
from gateway.redact import escape
from gateway.stream.dimse.associations import VERIFICATION
from gateway.stream.dimse.ian import INSTANCE_AVAILABILITY, Notice, Refusal, parse_notice, valid_uid
from gateway.stream.dimse.pduguard import peer_name
from gateway.stream.dimse.storescp import MoveListener, listen_host
from gateway.stream.source import Stop

__all__ = ["IanListener", "watch_notifications", "MAX_NOTICE_BYTES", "DEBOUNCE"]

log = logging.getLogger("gateway.dimse")

# The largest attribute list read: 20,000 referenced instances (ian.MAX_INSTANCES) take ~4 MiB.
MAX_NOTICE_BYTES = 8 * 1024 * 1024
DEBOUNCE = 0.1  # seconds a first notification waits for others of a burst (one harvest for all)
_STEP = 0.05  # seconds between the watcher thread's looks at ``stop``
_MAX_QUEUED = 1000  # paths queued before a harvest takes them; past it, the whole source is listed
_ASSOCIATIONS = 4  # at once: a PACS sends its notifications one association at a time
# N-CREATE failure statuses (PS3.7 10.1.5.1.6, Annex C) for the request itself; ``ian`` has the rest.
_NO_SUCH_SOP_CLASS = 0x0118
_INVALID_OBJECT_INSTANCE = 0x0117


class IanListener(MoveListener):
    """The N-CREATE SCP of the Instance Availability Notification SOP Class (and Verification, so
    that a PACS's operator can check the destination with a C-ECHO), admitting the configured
    PACS only, as ``MoveListener`` does. Each accepted notification goes to ``notified`` (called
    in pynetdicom's thread; it must not block)."""

    def __init__(self, name: str, config: SourceConfig, notified: Callable[[Notice], None]) -> None:
        # The PDU guard bounds what a peer sends by ``max_instance_bytes``: here, a notification's.
        super().__init__(name, replace(config, max_instance_bytes=MAX_NOTICE_BYTES), _no_store)
        self.titles = sorted({config.called_ae, config.move_source_ae or config.called_ae})
        self._notified = notified

    def start(self) -> None:
        assert self.config.ian_port is not None
        host, port = listen_host(self.name, self.config), self.config.ian_port
        ae = AE(ae_title=self.config.calling_ae)
        ae.acse_timeout = self.config.deadlines.connect
        ae.dimse_timeout = self.config.deadlines.message
        ae.network_timeout = self.config.deadlines.message  # a quiet connection holds a slot
        ae.maximum_associations = _ASSOCIATIONS
        ae.require_calling_aet = self.titles
        ae.require_called_aet = True
        # Other SOP classes are refused at association (no presentation context accepted).
        ae.add_supported_context(INSTANCE_AVAILABILITY, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(VERIFICATION)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_N_CREATE, self._created),
        ]
        try:
            self._server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise SourceUnavailable(
                f"source {self.name}: cannot listen for Instance Availability Notification on "
                f"{host}:{port}: {exc.strerror or exc}"
            ) from exc
        log.info(
            "source %s: Instance Availability Notification SCP %s listening on %s:%d for %s at %s",
            self.name,
            self.config.calling_ae,
            *self.address,
            "/".join(self.titles),
            self.config.host,
        )

    def _created(self, event: Any) -> tuple[int, Dataset | None]:
        """An N-CREATE (pynetdicom's thread): its status, Success once the hint is queued."""
        request = event.request
        sender = peer_name(event.assoc)
        sop_class = str(request.AffectedSOPClassUID or "")
        instance = request.AffectedSOPInstanceUID
        outcome: Notice | Refusal
        if sop_class != INSTANCE_AVAILABILITY:
            outcome = Refusal(_NO_SUCH_SOP_CLASS, f"an N-CREATE of SOP Class {escape(sop_class, 70)}")
        elif instance is not None and not valid_uid(str(instance)):
            outcome = Refusal(
                _INVALID_OBJECT_INSTANCE, f"SOP Instance UID {escape(instance, 70)} is not a UID"
            )
        else:
            data = request.AttributeList.getvalue() if request.AttributeList is not None else b""
            outcome = parse_notice(
                bytes(data), explicit=not UID(event.context.transfer_syntax).is_implicit_VR
            )
        if isinstance(outcome, Refusal):
            log.warning(
                "source %s: refused an Instance Availability Notification from %s (status %04X): %s",
                self.name,
                sender,
                outcome.status,
                escape(outcome.reason),
            )
            return outcome.status, None
        self._notified(outcome)
        log.info(
            "source %s: %s says study %s has %d instance(s) in %d series (%d unavailable): harvest queued",
            self.name,
            sender,
            outcome.StudyInstanceUID,
            outcome.instances,
            len(outcome.series),
            outcome.unavailable,
        )
        if instance is not None:
            return 0x0000, None
        # The SCU may leave the instance to the SCP, which then names it (PS3.7 10.1.5.1.4).
        reply = Dataset()
        reply.AffectedSOPInstanceUID = generate_uid()
        return 0x0000, reply


def _no_store(event: Any) -> int:
    return 0xA700  # never called: no storage context is offered


class _Hints:
    """Paths named by notifications and not yet handed to the harvest schedule (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self.ready = threading.Event()

    def add(self, notice: Notice) -> None:
        with self._lock:
            if "" not in self._paths:
                self._paths |= notice.paths()
            if len(self._paths) > _MAX_QUEUED:
                self._paths = {""}  # the whole source: what a full harvest lists
            self.ready.set()

    def take(self) -> set[str]:
        with self._lock:
            paths, self._paths = self._paths, set()
            self.ready.clear()
            return paths


async def watch_notifications(
    name: str, config: SourceConfig, changed: Callable[[set[str]], None], stop: Stop
) -> None:
    """Listen for notifications from the PACS of ``config`` and call ``changed`` on the event
    loop with the paths each burst names, until ``stop`` is set (or this is cancelled). Raises
    ``SourceError`` when it cannot listen (the port taken, no address to listen on)."""
    hints = _Hints()
    listener = IanListener(name, config, hints.add)
    halt = threading.Event()  # set when this watch ends: the thread sees it, not the loop

    def run() -> None:
        listener.start()
        try:
            while not (halt.is_set() or stop.is_set()):
                if not hints.ready.wait(_STEP):
                    continue
                time.sleep(DEBOUNCE)
                paths = hints.take()
                if paths and not halt.is_set():
                    anyio.from_thread.run_sync(changed, paths)
        finally:
            listener.close()

    try:
        await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except OSError as exc:
        raise SourceError(f"source {name}: cannot take notifications: {exc}") from exc
    finally:
        halt.set()
