"""The C-MOVE destination: the Storage SCP a PACS sends a C-MOVE's sub-operations to, accepting the
configured PACS only.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt

from gateway.config import SourceConfig
from gateway.errors import SourceUnavailable
from gateway.redact import escape
from gateway.stream.dimse.associations import STORAGE, SYNTAXES
from gateway.stream.dimse.pduguard import guard_association, peer_name

__all__ = ["MoveListener", "listen_host", "pacs_addresses"]

log = logging.getLogger("gateway.dimse")

_RESOLVE_EVERY = 60.0  # seconds before the PACS's host name is resolved again for an unknown peer


class MoveListener:
    """The Storage SCP that a C-MOVE's sub-operations come to: the PACS opens associations to
    the move destination and sends C-STOREs on them (PS3.4 C.4.2.3). Anyone who reaches its port
    could send, so it accepts associations from the configured PACS only:

    - from an address its ``host`` resolves to, checked when the connection opens: nothing is
      read from anyone else;
    - calling as ``move_source_ae`` (default ``called_ae``, the title the PACS answers to) and
      calling us as ``calling_ae``: A-ASSOCIATE-RJ otherwise (PS3.8 9.3.4, reasons 3 and 7);
    - within ``max_instance_bytes`` per instance, and ``UNASKED_BYTES`` for a C-STORE whose
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
