"""One audit record: who did what to which patient's study, and how it ended.

Every request writes exactly one (refusals included), but for the health probe, the viewer's
files and CORS preflights.
The store keeps them append-only; ``gateway.access.export`` turns them into DICOM audit messages
(PS3.15 A.5) and FHIR AuditEvent resources.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.redact import escape, redact

__all__ = ["AuditRecord", "ACTIONS", "OUTCOMES"]

# What was done. "query" is QIDO-RS, "retrieve" and "metadata" are WADO-RS; "*.list" and
# "audit.read" read the access settings and history; "other" is a request no resource answers.
ACTIONS = (
    "query",
    "retrieve",
    "metadata",
    "link.create",
    "link.list",
    "link.use",
    "link.revoke",
    "grant.create",
    "grant.list",
    "grant.revoke",
    "study.hide",
    "hidden.list",
    "study.unhide",
    "emergency.open",
    "emergency.list",
    "audit.read",
    "subscription.create",  # new-study notifications: subscribe, list, revoke,
    "subscription.list",
    "subscription.revoke",
    "notify.deliver",  # and each delivery attempt (by the gateway, for the subscriber)
    "changes.read",  # the change feed: the events of the patients named
    "fhir.search",  # FHIR ImagingStudy: a patient's imaging history searched,
    "fhir.read",  # or one study read
    "priors.list",  # a study's relevant priors (the patient's other studies)
    "viewer.open",
    "other",
)
# "incomplete": the response started but did not end (the client hung up, or a source failed
# mid-stream): the bytes counted are what was sent, not a whole answer.
OUTCOMES = ("success", "denied", "error", "incomplete")

# Bounds of what a record keeps of each text field (the rest becomes "…"): a request can carry
# 60 kB of junk in a path; the record keeps enough to see what it was.
_LIMITS = {"request_id": 32, "actor": 128, "issuer": 256, "role": 16, "action": 32, "outcome": 16}
_LIMITS |= {"patient": 64, "study": 64, "organization": 64, "reason": 512, "source": 64, "client": 64}
_LIMITS |= {"path": 512}


@dataclass(frozen=True)
class AuditRecord:
    """Every text field is escaped (one printable line, no character XML cannot hold) and bounded
    when the record is made, whoever makes it and from whatever it is read back, so no writer can
    store raw client input and every export is well-formed. A study that is not a UID is kept
    escaped, as asked."""

    time: float  # seconds since the epoch (UTC) when the request arrived
    request_id: str  # also sent back in the X-Request-ID response header
    actor: str  # the caller's identifier: RPPS, patient subject, "link:<id>", or "anonymous"
    role: str  # "patient", "professional", "emergency", "link", "open", "anonymous"
    action: str  # one of ACTIONS
    outcome: str  # one of OUTCOMES
    status: int  # the HTTP status answered
    patient: str | None = None  # the (first) patient concerned: INS when known, else PatientID
    study: str | None = None  # StudyInstanceUID, when one study is concerned
    organization: str | None = None  # the caller's organization (FINESS), professionals
    emergency: bool = False  # access under emergency rules (a reason is then given)
    reason: str | None = None  # emergency reason, or why access was denied
    source: str | None = None  # the source that delivered the bytes
    bytes_sent: int = 0  # body bytes sent to the client
    client: str | None = None  # the client's address
    path: str | None = None  # the request path (no query string: it may hold identifiers)
    ended: float | None = None  # when the response ended (PS3.15 A.5.3.7: a transfer's end)
    issuer: str | None = None  # the token issuer the actor is known to (actor is its subject)
    patients: tuple[str, ...] = ()  # every patient whose data the response carried (patient first)
    id: int | None = None  # set by the store: the record's position in the append-only log

    def __post_init__(self) -> None:
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if value is not None:
                if name == "path":
                    value = redact(value)
                object.__setattr__(self, name, escape(value, limit))
        patients = tuple(dict.fromkeys(escape(p, _LIMITS["patient"]) for p in self.patients if p))
        if self.patient and self.patient not in patients:
            patients = (self.patient, *patients)
        object.__setattr__(self, "patients", patients)
        if self.patient is None and patients:
            object.__setattr__(self, "patient", patients[0])
