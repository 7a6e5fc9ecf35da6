"""The ImagingStudy search parameters the gateway understands (FHIR R4 3.1.1, search), parsed into
a value without touching the framework's request: ``parse_search(params)``.

    patient.identifier=<system>|<INS>   (or subject:Patient.identifier=; the system may be left out)
    started=[eq|ge|gt|le|lt|sa|eb]<YYYY[-MM[-DD]]>   repeated: both bounds hold
    modality=[<system>|]<code>[,<code>...]           any of the codes (DICOM modalities)
    _count=<1..100>  (20)   _getpagesoffset=<n>  (0)

The patient is required: this search lists one patient's imaging history. A parameter not listed
here, a repeated one (``started`` aside), a value out of its bounds, or a form not supported (a
time in ``started``, the ``ne`` and ``ap`` prefixes, another system) is refused with a message
naming it (FHIR R4 3.1.1.5: a server SHALL NOT ignore what it does not support when it cannot
say so in the answer; the API turns the refusal into an OperationOutcome).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from gateway.errors import RequestError

__all__ = [
    "ImagingStudySearch",
    "parse_search",
    "INS_SYSTEMS",
    "NIR_SYSTEM",
    "DCM",
    "DEFAULT_COUNT",
    "MAX_COUNT",
    "MAX_OFFSET",
]

NIR_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"  # the INS based on the NIR (ANS, "Référentiel INS")
# The INS issuers (as gateway.registry.record.INS_ISSUERS: the NIR, and the test ranges).
INS_SYSTEMS = frozenset({NIR_SYSTEM, "urn:oid:1.2.250.1.213.1.4.10", "urn:oid:1.2.250.1.213.1.4.11"})
DCM = "http://dicom.nema.org/resources/ontology/DCM"  # DICOM's code system (PS3.16 CID 29, 33)
DEFAULT_COUNT, MAX_COUNT = 20, 100
MAX_OFFSET = 100_000  # past it, a narrower search (a date range) is what the caller needs
_MAX_VALUE = 256  # characters of one parameter's value

_PATIENT_KEYS = ("patient.identifier", "subject:Patient.identifier")
_KNOWN = (*_PATIENT_KEYS, "started", "modality", "_count", "_getpagesoffset")
_IDENTIFIER = re.compile(r"[0-9A-Za-z]{1,64}")
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")  # a CS value (PS3.5 6.2)
_DATE = re.compile(r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2}))?)?")
_PREFIX = re.compile(r"(eq|ne|gt|lt|ge|le|sa|eb|ap)?(.*)", re.DOTALL)
_NUMBER = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class ImagingStudySearch:
    patient: str  # the INS
    dates: tuple[str, str] = ("", "")  # StudyDate bounds, inclusive YYYYMMDD; "" for an open end
    modalities: tuple[str, ...] = ()  # any of them
    count: int = DEFAULT_COUNT
    offset: int = 0

    def with_offset(self, offset: int) -> ImagingStudySearch:
        return ImagingStudySearch(self.patient, self.dates, self.modalities, self.count, offset)


def parse_search(params: Iterable[tuple[str, str]]) -> ImagingStudySearch:
    """The search ``params`` (the query string's pairs, in order) ask for; RequestError naming
    what is wrong otherwise."""
    given: dict[str, list[str]] = {}
    for key, value in params:
        given.setdefault(key, []).append(value)
    unknown = sorted(key for key in given if key not in _KNOWN)
    if unknown:
        names = ", ".join(repr(key[:64]) for key in unknown[:10])
        raise RequestError(f"unknown search parameter(s) {names}: this server knows {', '.join(_KNOWN)}")
    for key, values in given.items():
        if key != "started" and len(values) > 1:
            raise RequestError(f"{key}: given {len(values)} times (list values in one, comma-separated)")
        if any(len(value) > _MAX_VALUE for value in values):
            raise RequestError(f"{key}: a value longer than {_MAX_VALUE} characters")
    patients = [given[key][0] for key in _PATIENT_KEYS if key in given]
    if not patients:
        raise RequestError("patient.identifier: required (<system>|<INS>, the patient whose studies to list)")
    if len(set(patients)) > 1:
        raise RequestError("patient.identifier and subject:Patient.identifier name different patients")
    low, high = "", ""
    for value in given.get("started", []):
        start, end = _bounds(value)
        low = max(low, start)  # "" sorts first: an open end never wins
        high = min(high, end) if high and end else (high or end)
    return ImagingStudySearch(
        _patient(patients[0]),
        (low, high),
        _modalities(given.get("modality", [""])[0]) if "modality" in given else (),
        _integer(given, "_count", DEFAULT_COUNT, 1, MAX_COUNT),
        _integer(given, "_getpagesoffset", 0, 0, MAX_OFFSET),
    )


def _patient(value: str) -> str:
    system, bar, identifier = value.rpartition("|")
    if bar and system and system not in INS_SYSTEMS:
        raise RequestError(
            f"patient.identifier: the system must be the INS ({NIR_SYSTEM}), not {system[:64]!r}"
        )
    if not _IDENTIFIER.fullmatch(identifier):
        raise RequestError("patient.identifier: the INS is 1 to 64 letters and digits")
    return identifier


def _modalities(value: str) -> tuple[str, ...]:
    out = []
    for item in value.split(","):
        system, bar, code = item.rpartition("|")
        if bar and system and system != DCM:
            raise RequestError(f"modality: the system must be {DCM}, not {system[:64]!r}")
        if not _MODALITY.fullmatch(code):
            raise RequestError(f"modality: {code[:32]!r} is not a DICOM modality code (e.g. CT, MR)")
        out.append(code)
    return tuple(dict.fromkeys(out))


def _integer(given: dict[str, list[str]], key: str, default: int, low: int, high: int) -> int:
    if key not in given:
        return default
    text = given[key][0]
    if not _NUMBER.fullmatch(text) or not low <= int(text) <= high:
        raise RequestError(f"{key}: an integer from {low} to {high} is required, not {text[:32]!r}")
    return int(text)


def _bounds(value: str) -> tuple[str, str]:
    """The inclusive StudyDate bounds (YYYYMMDD, "" when open) of one ``started`` value."""
    prefix, rest = _PREFIX.fullmatch(value).groups()  # type: ignore[union-attr]  # matches any text
    prefix = prefix or "eq"
    if prefix in ("ne", "ap"):
        raise RequestError(f"started: the prefix {prefix!r} is not supported (eq, ge, gt, le, lt, sa, eb)")
    found = _DATE.fullmatch(rest)
    if found is None:
        raise RequestError(f"started: {rest[:32]!r} is not a date (YYYY, YYYY-MM or YYYY-MM-DD)")
    year, month, day = int(found.group(1)), found.group(2), found.group(3)
    try:
        first = date(year, int(month or 1), int(day or 1))
        if day:
            last = first
        elif month:
            last = first.replace(day=calendar.monthrange(year, first.month)[1])
        else:
            last = date(year, 12, 31)
    except ValueError as exc:
        raise RequestError(f"started: {rest[:32]!r} is not a date ({exc})") from exc
    if prefix == "eq":
        return _dicom(first), _dicom(last)
    if prefix == "ge":
        return _dicom(first), ""
    if prefix in ("gt", "sa"):
        return _dicom(last + timedelta(days=1)) if last < date.max else "99991231", ""
    if prefix == "le":
        return "", _dicom(last)
    return "", _dicom(first - timedelta(days=1)) if first > date.min else "00000101"  # lt, eb


def _dicom(day: date) -> str:
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"
