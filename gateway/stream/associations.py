"""Associations with one DIMSE PACS: a small pool per SOP class, set up for C-GET.

An association for queries proposes the storage SOP classes with every syntax in one context each;
one for retrieving a known SOP class proposes that class once per transfer syntax, because the PACS
accepts one syntax per context and must find the one the instance is stored in (or transcode, or
fail). Idle associations are kept for ``_IDLE`` seconds: PACS drop idle ones, and finding out in the
middle of a request costs the request.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import StoragePresentationContexts

from gateway.config import SourceConfig
from gateway.errors import SourceTimeout, SourceUnavailable

__all__ = [
    "AssociationPool",
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
_POOL = 4  # idle associations kept per source
_IDLE = 20.0  # seconds an idle association is kept
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
        contexts = [build_context(model) for model in (VERIFICATION, STUDY_FIND, STUDY_GET, STUDY_MOVE)]
        if sop_class is None:
            return contexts + [build_context(storage, SYNTAXES) for storage in STORAGE]
        # One context per transfer syntax: the PACS accepts one syntax per context, and must find
        # the one the instance is stored in, or it would have to transcode (or fail to send it).
        return contexts + [build_context(sop_class, syntax) for syntax in SYNTAXES]

    def _associate(self, sop_class: str | None) -> Association:
        # C-GET sends the instances back on this association: we take the SCP role for storage.
        classes = STORAGE if sop_class is None else [sop_class]
        roles: list[Any] = [build_role(storage, scp_role=True) for storage in classes]
        sink: dict[str, Any] = {"put": None}

        def on_store(event: Any) -> int:
            put = sink["put"]
            if put is None:
                return 0xA700  # not expecting instances on this association
            put(bytes(event.encoded_dataset(include_meta=True)))
            return 0x0000

        started = time.monotonic()
        assoc = self.ae().associate(
            self.config.host or "",
            self.config.port,
            contexts=self._contexts(sop_class),
            ae_title=self.config.called_ae,
            ext_neg=roles,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
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
        """An association from the pool (one pool per SOP class retrieved, one for queries)."""
        with self._lock:
            idle = self._idle.setdefault(sop_class, [])
            assoc, since = idle.pop() if idle else (None, 0.0)
        if assoc is not None and time.monotonic() - since > _IDLE:
            assoc.release()  # PACS drop idle associations; do not find out mid-request
            assoc = None
        if assoc is None or not assoc.is_established:
            assoc = self._associate(sop_class)
        try:
            yield assoc
        finally:
            assoc.gateway_sink["put"] = None  # type: ignore[attr-defined]
            with self._lock:
                idle = self._idle.setdefault(sop_class, [])
                if assoc.is_established and len(idle) < _POOL:
                    idle.append((assoc, time.monotonic()))
                    assoc = None  # type: ignore[assignment]
            if assoc is not None and assoc.is_established:
                assoc.release()

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for pool in pools.values():
            for assoc, _ in pool:
                assoc.release()
