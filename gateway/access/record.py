"""One audit record: who did what to which patient's study, and how it ended.

Every QIDO, WADO, link, grant, hide and emergency access writes exactly one (denials included).
The store keeps them append-only; ``gateway.access.export`` turns them into DICOM audit messages
(PS3.15 A.5) and FHIR AuditEvent resources.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AuditRecord", "ACTIONS", "OUTCOMES"]

# What was done. "query" is QIDO-RS, "retrieve" and "metadata" are WADO-RS.
ACTIONS = (
    "query",
    "retrieve",
    "metadata",
    "link.create",
    "link.use",
    "link.revoke",
    "grant.create",
    "grant.revoke",
    "study.hide",
    "study.unhide",
    "emergency.open",
    "viewer.open",
)
OUTCOMES = ("success", "denied", "error")


@dataclass(frozen=True)
class AuditRecord:
    time: float  # seconds since the epoch (UTC) when the request arrived
    request_id: str  # also sent back in the X-Request-ID response header
    actor: str  # the caller's identifier: RPPS, patient subject, "link:<id>", or "anonymous"
    role: str  # "patient", "professional", "emergency", "link", "open", "anonymous"
    action: str  # one of ACTIONS
    outcome: str  # one of OUTCOMES
    status: int  # the HTTP status answered
    patient: str | None = None  # the patient concerned: INS when known, else PatientID
    study: str | None = None  # StudyInstanceUID, when one study is concerned
    organization: str | None = None  # the caller's organization (FINESS), professionals
    emergency: bool = False  # access under emergency rules (a reason is then given)
    reason: str | None = None  # emergency reason, or why access was denied
    source: str | None = None  # the source that delivered the bytes
    bytes_sent: int = 0  # body bytes sent to the client
    client: str | None = None  # the client's address
    path: str | None = None  # the request path (no query string: it may hold identifiers)
    id: int | None = None  # set by the store: the record's position in the append-only log
