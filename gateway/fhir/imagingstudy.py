"""FHIR R4 ImagingStudy resources from the index's summary of a study, with the Endpoint of the
gateway's DICOMweb base, and the searchset Bundle and OperationOutcome a search answers.

Each builder returns a ``fhir.resources.R4B`` model, validated on construction (structure,
cardinalities, data types: a ``started`` without a time zone, a negative count, a series without
a modality are refused there, not by the EHR that reads it).

Mapping (FHIR R4 ImagingStudy; the DICOM mapping of its section 8.2.8 where it gives one):

    id                    StudyInstanceUID (a UID fits FHIR's id: 64 digits and dots at most)
    identifier            urn:dicom:uid  urn:oid:<StudyInstanceUID>; AccessionNumber (v2-0203 ACSN)
    status                available (the index holds it)
    subject               Patient by identifier: the INS (urn:oid:1.2.250.1.213.1.4.8), else the
                          local PatientID (with urn:oid:<IssuerOfPatientID> when that is an OID)
    started               StudyDate + StudyTime in the zone given (DICOM dates carry none); the
                          date alone without a zone or a time
    modality              ModalitiesInStudy, system http://dicom.nema.org/resources/ontology/DCM
    numberOf*             NumberOfStudyRelatedSeries / Instances
    description           StudyDescription
    endpoint              #dicomweb: a contained Endpoint, dicom-wado-rs at the gateway's DICOMweb base
    series                uid, number, modality, description, numberOfInstances, bodySite
                          (BodyPartExamined as SNOMED CT when a defined term, else as text)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime, tzinfo
from typing import Any, Protocol

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome

from gateway.fhir.bodysite import body_site
from gateway.fhir.search import DCM, NIR_SYSTEM

__all__ = [
    "SeriesFacts",
    "StudyFacts",
    "FHIR_JSON",
    "DICOM_UID",
    "ENDPOINT_ID",
    "dicomweb_endpoint",
    "imaging_study",
    "searchset",
    "operation_outcome",
]

FHIR_JSON = "application/fhir+json"
DICOM_UID = "urn:dicom:uid"  # FHIR R4 ImagingStudy: the study's identifier system
ENDPOINT_ID = "dicomweb"
_CONNECTION = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_OID = re.compile(r"[0-2](\.(0|[1-9]\d*))+")
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?")


class SeriesFacts(Protocol):
    """What a series summary gives (``gateway.registry.history.SeriesSummary`` is one)."""

    @property
    def SeriesInstanceUID(self) -> str: ...
    @property
    def SeriesNumber(self) -> int | None: ...
    @property
    def Modality(self) -> str | None: ...
    @property
    def SeriesDescription(self) -> str | None: ...
    @property
    def BodyPartExamined(self) -> str | None: ...
    @property
    def instances(self) -> int: ...


class StudyFacts(Protocol):
    """What a study summary gives (``gateway.registry.history.StudySummary`` is one)."""

    @property
    def StudyInstanceUID(self) -> str: ...
    @property
    def StudyDate(self) -> str | None: ...
    @property
    def StudyTime(self) -> str | None: ...
    @property
    def StudyDescription(self) -> str | None: ...
    @property
    def AccessionNumber(self) -> str | None: ...
    @property
    def PatientID(self) -> str: ...
    @property
    def IssuerOfPatientID(self) -> str: ...
    @property
    def INS(self) -> str | None: ...
    @property
    def instances(self) -> int: ...
    @property
    def modalities(self) -> tuple[str, ...]: ...
    @property
    def series(self) -> Sequence[SeriesFacts]: ...


def dicomweb_endpoint(address: str) -> Endpoint:
    """The gateway's DICOMweb service (WADO-RS, QIDO-RS) as an Endpoint; ``address`` is its
    public base, e.g. https://imaging.example/dicom-web."""
    return Endpoint.model_validate(
        {
            "resourceType": "Endpoint",
            "id": ENDPOINT_ID,
            "status": "active",
            "connectionType": {"system": _CONNECTION, "code": "dicom-wado-rs"},
            "name": "DICOMweb gateway",
            "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"],
            "address": address,
        }
    )


def imaging_study(study: StudyFacts, dicomweb: str, zone: tzinfo | None = None) -> ImagingStudy:
    """The ImagingStudy of ``study``, its Endpoint (``dicomweb``: the public DICOMweb base)
    contained; ``zone``: where the study's local date and time were taken."""
    identifiers: list[dict[str, Any]] = [
        {"use": "official", "system": DICOM_UID, "value": f"urn:oid:{study.StudyInstanceUID}"}
    ]
    if study.AccessionNumber:
        identifiers.append(
            {
                "type": {"coding": [{"system": _V2_0203, "code": "ACSN"}]},
                "value": study.AccessionNumber,
            }
        )
    body: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study.StudyInstanceUID,
        "contained": [dicomweb_endpoint(dicomweb)],
        "identifier": identifiers,
        "status": "available",
        "subject": {"type": "Patient", "identifier": _patient_identifier(study)},
        "endpoint": [{"reference": f"#{ENDPOINT_ID}"}],
        "numberOfSeries": len(study.series),
        "numberOfInstances": study.instances,
    }
    started = _started(study.StudyDate, study.StudyTime, zone)
    if started:
        body["started"] = started
    if study.modalities:
        body["modality"] = [{"system": DCM, "code": code} for code in study.modalities]
    if study.StudyDescription:
        body["description"] = study.StudyDescription
    if study.series:
        body["series"] = [_series(series) for series in study.series]
    return ImagingStudy.model_validate(body)


def searchset(resources: Iterable[tuple[str, Any]], total: int, links: Sequence[tuple[str, str]]) -> Bundle:
    """A searchset Bundle: ``resources`` as (fullUrl, resource), ``total`` matches in all,
    ``links`` as (relation, url): self, next, previous."""
    return Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": [{"relation": relation, "url": url} for relation, url in links],
            "entry": [
                {"fullUrl": url, "resource": resource, "search": {"mode": "match"}}
                for url, resource in resources
            ],
        }
    )


def operation_outcome(diagnostics: str, code: str = "invalid", severity: str = "error") -> OperationOutcome:
    """One issue (FHIR R4 issue-type ``code``): what a refused search answers."""
    return OperationOutcome.model_validate(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
        }
    )


def _patient_identifier(study: StudyFacts) -> dict[str, str]:
    if study.INS:
        return {"system": NIR_SYSTEM, "value": study.INS}
    identifier = {"value": study.PatientID or "unknown"}
    if _OID.fullmatch(study.IssuerOfPatientID):
        identifier["system"] = f"urn:oid:{study.IssuerOfPatientID}"
    return identifier


def _series(series: SeriesFacts) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uid": series.SeriesInstanceUID,
        # Modality is type 1 (PS3.3 C.7.3.1); a series indexed without one is "other".
        "modality": {"system": DCM, "code": series.Modality or "OT"},
        "numberOfInstances": series.instances,
    }
    if series.SeriesNumber is not None and series.SeriesNumber >= 0:
        out["number"] = series.SeriesNumber
    if series.SeriesDescription:
        out["description"] = series.SeriesDescription
    if series.BodyPartExamined:
        out["bodySite"] = body_site(series.BodyPartExamined)
    return out


def _started(day: str | None, time: str | None, zone: tzinfo | None) -> str | None:
    """FHIR dateTime of a DICOM DA and TM: with the time only when a zone says where (FHIR:
    a dateTime with a time SHALL have a zone), the date alone otherwise; None when not a date."""
    if not day or not re.fullmatch(r"\d{8}", day):
        return None
    try:
        base = datetime(int(day[:4]), int(day[4:6]), int(day[6:]))
    except ValueError:
        return None
    found = _TIME.match(time.replace(":", "")) if time else None
    if zone is None or found is None:
        return base.date().isoformat()
    hour, minute, second = (int(found.group(i) or 0) for i in (1, 2, 3))
    if hour > 23 or minute > 59 or second > 59:  # a leap second, or garbage: the date is still true
        return base.date().isoformat()
    return base.replace(hour=hour, minute=minute, second=second, tzinfo=zone).isoformat()
