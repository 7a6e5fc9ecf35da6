"""The access policy, one place for QIDO and WADO alike: which studies a principal may see.

- A patient sees the studies of their own INS (their hidden ones too: they must be able to unhide).
- A professional sees a patient's studies when the patient granted access to them or to their
  organization (revocable, optionally expiring), or during an emergency access they opened with a
  reason (roles configured as emergency only; time-limited; audited; visible to the patient).
- A study link's session sees that one study, read-only.
- A study its patient hid is seen by nobody else, emergency access and links included.
- Open access (a configured demo) sees everything.

Refusals: QIDO leaves out what the caller may not see, silently (PS3.18 gives a search no way to
say "some results withheld", and saying it would disclose them). WADO on a study the caller may not
see answers 404 for patients, links and hidden studies: the study's existence is not disclosed to
someone with no business knowing it. A professional without the patient's consent gets 403, with
what to do next (ask the patient for a grant, or open emergency access): their software knows
the study from the shared record anyway, and a bare 404 would send them looking for a fault.

Decisions are recomputed at most one second apart (``_FRESH``), so a grant revoked, a study hidden
or a link revoked takes effect within a second, on every node sharing the database.

Patients are matched by INS only: a study whose files carry no INS (at any site) is visible to
professionals with a grant and to the patient's links, but not in the patient's own list.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from gateway.access.identity import Principal
from gateway.access.store import AccessStore
from gateway.errors import Forbidden, NotFound, Unauthenticated
from gateway.registry.qido import Restriction
from gateway.registry.store import Registry

__all__ = ["Policy", "StudyAccess"]

_FRESH = 1.0  # seconds a decision may be reused
_STUDIES = 4096  # study -> patient INS lookups remembered (facts of the index, not decisions)


class StudyAccess:
    """Why a principal may see a study: the patient concerned and whether by emergency rules."""

    __slots__ = ("patient", "emergency")

    def __init__(self, patient: str | None, emergency: bool) -> None:
        self.patient = patient
        self.emergency = emergency


class Policy:
    def __init__(self, store: AccessStore, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        self._decisions: dict[tuple[Principal, str], tuple[float, object]] = {}
        self._patients: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    # -- what a caller sees --------------------------------------------------------------------

    def restriction(self, principal: Principal) -> Restriction | None:
        """The QIDO restriction for ``principal`` (None: everything)."""
        return self._cached(principal, "restriction", lambda: self._restriction(principal))  # type: ignore[return-value]

    def _restriction(self, principal: Principal) -> Restriction | None:
        now = time.time()
        if principal.role == "open":
            return None
        if principal.role == "patient":
            assert principal.ins is not None
            return Restriction(patients=frozenset({principal.ins}))
        if principal.role == "link":
            assert principal.study is not None
            gone = frozenset({principal.study}) if self.store.is_hidden(principal.study) else frozenset()
            return Restriction(studies=frozenset({principal.study}), hidden=gone)
        if principal.role == "professional":
            patients = self.store.granted_patients(principal.grantee_keys, now)
            patients |= self.store.emergency_patients(principal.actor, now)
            hidden = self.store.hidden_of(patients)
            return Restriction(patients=frozenset(patients), hidden=frozenset(hidden))
        raise Unauthenticated("credentials are needed (Authorization: Bearer <token>, or a study link)")

    def check_study(self, principal: Principal, study: str) -> StudyAccess:
        """May ``principal`` read ``study``? Raises the refusal (see the module docstring)."""
        decision = self._cached(principal, study, lambda: self._decide(principal, study))
        if isinstance(decision, Exception):
            raise decision
        assert isinstance(decision, StudyAccess)
        return decision

    def _decide(self, principal: Principal, study: str) -> StudyAccess | Exception:
        patient = self.study_patient(study)
        if principal.role == "open":
            return StudyAccess(patient, False)
        if principal.role == "anonymous":
            return Unauthenticated("credentials are needed (Authorization: Bearer <token>, or a study link)")
        unseen = NotFound(f"study {study} not found")
        if principal.role == "patient":
            return StudyAccess(patient, False) if patient and patient == principal.ins else unseen
        if self.store.is_hidden(study):
            return unseen
        if principal.role == "link":
            return StudyAccess(patient, False) if study == principal.study else unseen
        # A professional.
        if patient is None:
            return Forbidden(
                f"study {study}: its patient has no INS in the index, so no patient's consent can cover it"
            )
        now = time.time()
        if patient in self.store.granted_patients(principal.grantee_keys, now):
            return StudyAccess(patient, False)
        if patient in self.store.emergency_patients(principal.actor, now):
            return StudyAccess(patient, True)
        hint = (
            "open emergency access (POST /api/emergency with the patient and a reason)"
            if principal.emergency
            else "the patient can grant it from the portal"
        )
        return Forbidden(f"study {study}: no access granted by the patient to {principal.actor}; {hint}")

    # -- facts from the index ------------------------------------------------------------------

    def study_patient(self, study: str) -> str | None:
        """The INS of the study's patient (None when not known, or no such study)."""
        now = time.monotonic()
        with self._lock:
            known = self._patients.get(study)
        if known is not None and now - known[0] < 10 * _FRESH:
            return known[1]
        rows = self.registry.query(
            "SELECT p.INS FROM studies st JOIN patients p ON p.id = st.patient WHERE st.StudyInstanceUID = ?",
            (study,),
        )
        ins = rows[0][0] if rows and rows[0][0] else None
        with self._lock:
            self._patients[study] = (now, ins)
            self._patients.move_to_end(study)
            while len(self._patients) > _STUDIES:
                self._patients.popitem(last=False)
        return ins

    def _cached(self, principal: Principal, key: str, decide):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        with self._lock:
            found = self._decisions.get((principal, key))
        if found is not None and now - found[0] < _FRESH:
            return found[1]
        value = decide()
        with self._lock:
            if len(self._decisions) > 10_000:
                self._decisions = {k: v for k, v in self._decisions.items() if now - v[0] < _FRESH}
            self._decisions[(principal, key)] = (now, value)
        return value

    def forget(self) -> None:
        """Drop cached decisions (this node's own changes take effect at once)."""
        with self._lock:
            self._decisions.clear()
