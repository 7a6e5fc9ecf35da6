"""The access policy, one place for QIDO and WADO alike: which studies a principal may see.

- A patient sees the studies of their own INS (their hidden ones too: they must be able to unhide).
- A professional sees a patient's studies when the patient granted access to them or to their
  organization (revocable, optionally expiring), or during an emergency access they opened with a
  reason (roles configured as emergency only; time-limited; audited; visible to the patient).
- A system client (an EHR or a RIS with its own credentials) sees a patient's studies when the
  patient granted access to its organization; never by emergency rules. It gets a professional's
  refusals.
- A study link's session sees that one study, read-only.
- A study its patient hid is seen by nobody else, emergency access and links included.
- Open access (a configured demo) sees everything.

Refusals: QIDO leaves out what the caller may not see, silently (PS3.18 gives a search no way to
say "some results withheld", and saying it would disclose them). WADO on a study the caller may
not see gets one answer per kind of caller, the same whether the study does not exist, is hidden,
has no INS, or belongs to a patient who did not grant access: any difference would tell "this UID
is a study here". Patients and links get 404. Professionals get 403 saying how access is
obtained (the patient's grant, or emergency access for emergency roles): their software knows the
study from the shared record anyway, and a bare 404 would send them looking for a fault.

A study link's session holds only while the consent it was made under holds: a professional's
link works while the patient's grant to them (or their organization) does (``link_consented``).

Decisions are recomputed at most one second apart (``_FRESH``), so a grant revoked, a study hidden
or a link revoked takes effect within a second, on every node sharing the database.

Patients are matched by INS only: a study whose files carry no INS (at any site) is visible to
professionals with a grant and to the patient's links, but not in the patient's own list.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict

from gateway.access.identity import Principal
from gateway.access.store import AccessStore
from gateway.errors import Forbidden, NotFound, Unauthenticated
from gateway.redact import escape
from gateway.registry.store import Registry
from gateway.types import Restriction

__all__ = ["Policy", "StudyAccess"]

_FRESH = 1.0  # seconds a decision may be reused
_UID = re.compile(r"[0-9.]{1,64}")
_STUDIES = 4096  # study -> patient INS lookups remembered (facts of the index, not decisions)


class StudyAccess:
    """Why a principal may see a study: the patient concerned and whether by emergency rules."""

    __slots__ = ("patient", "emergency")

    def __init__(self, patient: str | None, emergency: bool) -> None:
        self.patient = patient
        self.emergency = emergency


def _unseen(what: str) -> NotFound:
    return NotFound(f"{escape(what, 80)} not found")


def _no_access(principal: Principal, what: str) -> Forbidden:
    """The one refusal a professional gets, whatever the reason (see the module docstring)."""
    hint = (
        "open emergency access (POST /api/emergency with the patient and a reason)"
        if principal.emergency
        else "the patient can grant it from the portal"
    )
    return Forbidden(f"{escape(what, 80)}: no access for {principal.actor} (if it exists here, {hint})")


class Policy:
    def __init__(self, store: AccessStore, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        self._decisions: dict[tuple[Principal, str], tuple[float, object]] = {}
        self._patients: OrderedDict[str, tuple[float, tuple[bool, str | None]]] = OrderedDict()
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
            assert principal.study is not None and principal.link is not None
            gone = self.store.is_hidden(principal.study) or not self.store.link_consented(principal.link, now)
            return Restriction(
                studies=frozenset({principal.study}), hidden=frozenset({principal.study} if gone else ())
            )
        if principal.consents:  # a professional or a system client
            patients = self.store.granted_patients(principal.grantee_keys, now)
            patients |= self.store.emergency_patients(principal.key, now)
            hidden = self.store.hidden_of(patients)
            return Restriction(patients=frozenset(patients), hidden=frozenset(hidden))
        raise Unauthenticated("credentials are needed (Authorization: Bearer <token>, or a study link)")

    def check_study(self, principal: Principal, study: str) -> StudyAccess:
        """May ``principal`` read ``study``? Raises the refusal (see the module docstring)."""
        if not _UID.fullmatch(study):  # decided without a lookup, and not remembered
            decision = self._decide(principal, study)
        else:
            decision = self._cached(principal, study, lambda: self._decide(principal, study))
        if isinstance(decision, Exception):
            raise decision
        assert isinstance(decision, StudyAccess)
        return decision

    def _decide(self, principal: Principal, study: str) -> StudyAccess | Exception:
        if principal.role == "anonymous":
            return Unauthenticated("credentials are needed (Authorization: Bearer <token>, or a study link)")
        # Not a UID (PS3.5 9.1: digits and dots, at most 64): no study, and nothing to look up.
        exists, patient = self.study_patient(study) if _UID.fullmatch(study) else (False, None)
        if principal.role == "open":
            return StudyAccess(patient, False) if exists else _unseen(f"study {study}")
        if principal.role == "patient":
            return StudyAccess(patient, False) if exists and patient == principal.ins else _unseen(study)
        refusal = _unseen(study) if principal.role == "link" else _no_access(principal, study)
        if not exists or self.store.is_hidden(study):
            return refusal
        now = time.time()
        if principal.role == "link":  # names its study: no INS needed
            if study == principal.study and self.store.link_consented(principal.link or "", now):
                return StudyAccess(patient, False)
            return refusal
        if patient is None:  # a professional: consent is given per INS, none can cover this study
            return refusal
        return self._consented(principal, patient, now) or refusal

    def check_patient(self, principal: Principal, patient: str) -> StudyAccess:
        """May ``principal`` see ``patient``'s studies (an INS)? The same refusals as a study's."""
        decision = self._cached(
            principal, f"patient:{patient}", lambda: self._decide_patient(principal, patient)
        )
        if isinstance(decision, Exception):
            raise decision
        assert isinstance(decision, StudyAccess)
        return decision

    def _decide_patient(self, principal: Principal, patient: str) -> StudyAccess | Exception:
        if principal.role == "open":
            return StudyAccess(patient, False)
        if principal.role == "anonymous":
            return Unauthenticated("credentials are needed (Authorization: Bearer <token>, or a study link)")
        if principal.role == "patient":
            return StudyAccess(patient, False) if patient == principal.ins else _unseen(f"patient {patient}")
        if principal.consents:
            return self._consented(principal, patient, time.time()) or _no_access(
                principal, f"patient {patient}"
            )
        return _unseen(f"patient {patient}")  # a link sees one study, not a patient

    def _consented(self, principal: Principal, patient: str, now: float) -> StudyAccess | None:
        """A professional's access to ``patient``: by the patient's grant, else by an emergency
        access they opened; None without either."""
        if patient in self.store.granted_patients(principal.grantee_keys, now):
            return StudyAccess(patient, False)
        if patient in self.store.emergency_patients(principal.key, now):
            return StudyAccess(patient, True)
        return None

    def emergency_among(self, principal: Principal, patients: set[str]) -> bool:
        """Did ``principal`` see any of ``patients`` by emergency rules only (for the audit)?"""
        if not principal.consents or not patients:
            return False
        now = time.time()
        urgent = self._cached(
            principal, "emergency", lambda: self.store.emergency_patients(principal.key, now)
        )
        granted = self._cached(
            principal, "granted", lambda: self.store.granted_patients(principal.grantee_keys, now)
        )
        return bool((patients & urgent) - granted)  # type: ignore[operator]

    # -- facts from the index ------------------------------------------------------------------

    def study_patient(self, study: str) -> tuple[bool, str | None]:
        """Whether the study is in the index, and the INS of its patient (None when not known)."""
        now = time.monotonic()
        with self._lock:
            known = self._patients.get(study)
        if known is not None and now - known[0] < 10 * _FRESH:
            return known[1]
        found = self.registry.study_patient(study)
        if not found[0]:
            # Not remembered: a viewer or a subscriber asks for a study before its last file has
            # landed; it must see it as soon as the harvest commits (the 1 s decision cache
            # still spares the index repeated lookups by one caller).
            return found
        with self._lock:
            self._patients[study] = (now, found)
            self._patients.move_to_end(study)
            while len(self._patients) > _STUDIES:
                self._patients.popitem(last=False)
        return found

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
