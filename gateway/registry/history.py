"""A patient's imaging history: their studies across every source, joined by the national
identifier (INS), as the FHIR ImagingStudy search and the relevant priors need them.

A patient is one person across sites when their files carry the INS (``record.INS_ISSUERS``): the
patients table keeps each site's local ID with the INS it found, so "the studies of INS X" is one
indexed lookup (``patients_ins``) whatever the PatientID at each site. A study whose files carry no
INS has only its local patient: its history is that patient's studies at that site.

The caller's restriction (``gateway.access.policy``) is applied in the SQL exactly as QIDO applies
it (``qido``): what the caller may not see is left out, silently. Each study comes with what a list
of a patient's imaging needs: date and time, description, accession number, modalities, body parts
examined, its series (number, modality, description, body part, instance count), instance count,
and the sources that hold it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gateway.registry.database import in_chunks
from gateway.registry.qido import restricted
from gateway.types import Restriction

if TYPE_CHECKING:
    from gateway.registry.store import Registry

__all__ = [
    "SeriesSummary",
    "StudySummary",
    "History",
    "patient_history",
    "study_history",
    "study_summaries",
    "MAX_PAGE",
]

MAX_PAGE = 1000  # studies one call returns at most (a patient with more is paged)
_DATE = re.compile(r"\d{8}")
# PS3.3 C.7.3.1: AnatomicRegionSequence; the code of its item says what the series shows.
_ANATOMIC_REGION, _CODE_VALUE, _SCHEME = "00082218", "00080100", "00080102"
_ORDER = "st.StudyDate DESC, st.StudyTime_norm DESC, st.StudyInstanceUID"


@dataclass(frozen=True)
class SeriesSummary:
    SeriesInstanceUID: str
    SeriesNumber: int | None
    Modality: str | None
    SeriesDescription: str | None
    BodyPartExamined: str | None
    instances: int  # NumberOfSeriesRelatedInstances
    # (coding scheme designator, code value) of the AnatomicRegionSequence of its first instance;
    # read only when asked for (``anatomy=True``), from the stored DICOM JSON.
    anatomy: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StudySummary:
    StudyInstanceUID: str
    StudyDate: str | None  # YYYYMMDD as indexed
    StudyTime: str | None  # HHMMSS[.F] as indexed
    StudyDescription: str | None
    AccessionNumber: str | None
    PatientID: str
    IssuerOfPatientID: str
    INS: str | None  # the patient's national identifier, when the files carry it
    instances: int  # NumberOfStudyRelatedInstances
    series: tuple[SeriesSummary, ...]
    sources: tuple[str, ...]  # the sources holding at least one of its instances, sorted

    @property
    def modalities(self) -> tuple[str, ...]:
        """ModalitiesInStudy: the distinct modalities of its series, in series order."""
        return tuple(dict.fromkeys(s.Modality for s in self.series if s.Modality))

    @property
    def body_parts(self) -> tuple[str, ...]:
        """The distinct BodyPartExamined of its series, in series order."""
        return tuple(dict.fromkeys(s.BodyPartExamined for s in self.series if s.BodyPartExamined))


@dataclass(frozen=True)
class History:
    """One page of a patient's studies, newest first, and how many match in all."""

    studies: list[StudySummary]
    total: int


def patient_history(
    registry: Registry,
    ins: str,
    restriction: Restriction | None,
    *,
    dates: tuple[str, str] = ("", ""),
    modalities: Sequence[str] = (),
    limit: int = 20,
    offset: int = 0,
    anatomy: bool = False,
) -> History:
    """The studies of the patient whose INS is ``ins`` that ``restriction`` lets the caller see,
    newest first: those dated within ``dates`` (inclusive YYYYMMDD bounds, "" for an open end:
    a study without a date matches only when both ends are open) and, if given, with a series of
    one of ``modalities``; ``limit`` of them from ``offset``, with the total that match."""
    where, params = ["p.INS = ?"], [ins]
    low, high = dates
    for bound, operator in ((low, ">="), (high, "<=")):
        if bound:
            if not _DATE.fullmatch(bound):
                raise ValueError(f"a date bound is YYYYMMDD: {bound!r}")
            where.append(f"st.StudyDate {operator} ?")
            params.append(bound)
    if modalities:
        where.append(
            "EXISTS (SELECT 1 FROM series m WHERE m.StudyInstanceUID = st.StudyInstanceUID "
            f"AND m.Modality IN ({','.join('?' * len(modalities))}))"
        )
        params.extend(modalities)
    return _page(registry, where, params, restriction, limit, offset, anatomy)


def study_history(
    registry: Registry, study: str, restriction: Restriction | None, limit: int = 200, anatomy: bool = True
) -> tuple[StudySummary | None, History]:
    """The study ``study`` (None when not indexed; it is not restricted here: the caller decided
    on it already) and up to ``limit`` other studies of its patient that ``restriction`` lets the
    caller see, newest first: by INS across sites, else that site's local patient."""
    rows = registry.query(
        "SELECT p.id, p.INS FROM studies st JOIN patients p ON p.id = st.patient "
        "WHERE st.StudyInstanceUID = ?",
        (study,),
    )
    if not rows:
        return None, History([], 0)
    patient_row, ins = rows[0][0], rows[0][1]
    current = study_summaries(registry, [study], anatomy)
    where = ["p.INS = ?" if ins else "p.id = ?", "st.StudyInstanceUID <> ?"]
    params: list[Any] = [ins if ins else patient_row, study]
    others = _page(registry, where, params, restriction, limit, 0, anatomy)
    return (current[0] if current else None), others


def study_summaries(registry: Registry, uids: Sequence[str], anatomy: bool = False) -> list[StudySummary]:
    """The summary of each study ``uids`` names that is indexed, in the order given."""
    uids = list(dict.fromkeys(uids))
    studies: dict[str, tuple[Any, ...]] = {}
    series: dict[str, list[SeriesSummary]] = {uid: [] for uid in uids}
    sources: dict[str, set[str]] = {uid: set() for uid in uids}
    for chunk in in_chunks(uids):
        marks = ",".join("?" * len(chunk))
        for row in registry.query(
            "SELECT st.StudyInstanceUID, st.StudyDate, st.StudyTime, st.StudyDescription, "
            "st.AccessionNumber, p.PatientID, p.IssuerOfPatientID, p.INS, st.NumberOfStudyRelatedInstances "
            f"FROM studies st JOIN patients p ON p.id = st.patient WHERE st.StudyInstanceUID IN ({marks})",
            chunk,
        ):
            studies[row[0]] = tuple(row)
        series_rows = registry.query(
            "SELECT se.StudyInstanceUID, se.SeriesInstanceUID, se.SeriesNumber, se.Modality, "
            "se.SeriesDescription, se.BodyPartExamined, se.NumberOfSeriesRelatedInstances "
            f"FROM series se WHERE se.StudyInstanceUID IN ({marks}) "
            "ORDER BY se.StudyInstanceUID, se.SeriesNumber, se.SeriesInstanceUID",
            chunk,
        )
        codes = _anatomy(registry, [row[1] for row in series_rows]) if anatomy else {}
        for study, uid, number, modality, description, part, count in series_rows:
            series[study].append(
                SeriesSummary(uid, number, modality, description, part, count or 0, codes.get(uid, ()))
            )
        # The sources of a study: one index seek per series (locations by instance), DISTINCT
        # over the study's instances.
        for study, source in registry.query(
            "SELECT DISTINCT se.StudyInstanceUID, l.source FROM series se "
            "JOIN instances i ON i.SeriesInstanceUID = se.SeriesInstanceUID "
            "JOIN locations l ON l.SOPInstanceUID = i.SOPInstanceUID "
            f"WHERE se.StudyInstanceUID IN ({marks})",
            chunk,
        ):
            sources[study].add(source)
    out = []
    for uid in uids:
        found = studies.get(uid)
        if found is None:
            continue
        _, date, time, description, accession, patient_id, issuer, ins, count = found
        out.append(
            StudySummary(
                uid,
                date or None,
                time or None,
                description or None,
                accession or None,
                patient_id or "",
                issuer or "",
                ins or None,
                count or 0,
                tuple(series[uid]),
                tuple(sorted(sources[uid])),
            )
        )
    return out


def _page(
    registry: Registry,
    where: list[str],
    params: list[Any],
    restriction: Restriction | None,
    limit: int,
    offset: int,
    anatomy: bool,
) -> History:
    if not 0 < limit <= MAX_PAGE or offset < 0:
        raise ValueError(f"limit is 1 to {MAX_PAGE}, offset at least 0: {limit}, {offset}")
    where, params = list(where), list(params)
    if restriction is not None:
        where += restricted(restriction, "p.INS", "st.StudyInstanceUID", registry.dialect, params)
    tables = "studies st JOIN patients p ON p.id = st.patient"
    condition = " AND ".join(where)
    total = registry.query(f"SELECT COUNT(*) FROM {tables} WHERE {condition}", params)[0][0]
    uids = [
        row[0]
        for row in registry.query(
            f"SELECT st.StudyInstanceUID FROM {tables} WHERE {condition} ORDER BY {_ORDER} LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
    ]
    return History(study_summaries(registry, uids, anatomy), int(total))


def _anatomy(registry: Registry, series: Sequence[str]) -> dict[str, tuple[tuple[str, str], ...]]:
    """The AnatomicRegionSequence codes of each series' first instance (its stored DICOM JSON)."""
    out: dict[str, tuple[tuple[str, str], ...]] = {}
    for uid, metadata in registry.first_instances("series", series).items():
        try:
            items = orjson.loads(metadata).get(_ANATOMIC_REGION, {}).get("Value") or []
            found = tuple(
                (str(item[_SCHEME]["Value"][0]), str(item[_CODE_VALUE]["Value"][0]))
                for item in items
                if isinstance(item, dict) and _CODE_VALUE in item and _SCHEME in item
            )
        except (orjson.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError):
            continue  # a malformed code says nothing about the anatomy; the rest still does
        if found:
            out[uid] = found
    return out
