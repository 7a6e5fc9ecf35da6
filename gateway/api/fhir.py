"""FHIR R4 ImagingStudy: a patient's imaging history as an EHR or the portal reads it.

    GET    /fhir/ImagingStudy?patient.identifier=<system>|<INS>[&started=ge2024-01-01][&modality=CT]
                                  [&_count=20][&_getpagesoffset=0]      searchset Bundle
    GET    /fhir/ImagingStudy/{StudyInstanceUID}                        one ImagingStudy

Answers are ``application/fhir+json``; each ImagingStudy contains the Endpoint of the gateway's
DICOMweb base (``server.public_url`` + /dicom-web, never the request's Host). The search is a
search like QIDO: what the caller may not see is left out silently, so a patient who does not
exist, did not grant the caller, or hid every study gets the same empty Bundle; a search the
server cannot answer as asked (an unknown parameter, a bad value) is a 400 with an
OperationOutcome naming it. A read is a study's retrieval: the policy decides on the study, with
the one refusal of the rest of the API. Each answer's audit record names every patient it carried.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import urls
from gateway.api.common import access_of, run
from gateway.api.middleware import audit_of
from gateway.errors import NotFound, RequestError
from gateway.fhir.imagingstudy import FHIR_JSON, imaging_study, operation_outcome, searchset
from gateway.fhir.search import NIR_SYSTEM, ImagingStudySearch, parse_search
from gateway.redact import escape
from gateway.registry.history import StudySummary, patient_history, study_summaries
from gateway.registry.store import Registry

__all__ = ["ROUTES", "search_imaging_studies", "read_imaging_study", "STUDY_ZONE"]

# DICOM dates and times are local and carry no zone (TimezoneOffsetFromUTC is rarely sent); the
# gateway serves the French DMP, so they are read as Paris time. Without the zone database the
# date alone is given (a FHIR dateTime with a time must have a zone).
try:
    STUDY_ZONE: ZoneInfo | None = ZoneInfo("Europe/Paris")
except ZoneInfoNotFoundError:  # pragma: no cover - a system without tzdata
    STUDY_ZONE = None


def _registry(request: Request) -> Registry:
    return access_of(request).policy.registry


def _fhir(resource: Any, status: int = 200) -> Response:
    return Response(resource.model_dump_json().encode(), status_code=status, media_type=FHIR_JSON)


async def search_imaging_studies(request: Request) -> Response:
    access = access_of(request)
    principal = request.scope["state"]["principal"]
    noted = audit_of(request.scope)
    restriction = await run(access.policy.restriction, principal)  # anonymous: refused here
    try:
        search = parse_search(request.query_params.multi_items())
    except RequestError as exc:
        noted["refusal"] = exc.message
        return _fhir(operation_outcome(escape(exc.message, 512)), exc.status)
    history = await run(
        lambda: patient_history(
            _registry(request),
            search.patient,
            restriction,
            dates=search.dates,
            modalities=search.modalities,
            limit=search.count,
            offset=search.offset,
        )
    )
    patients = {study.INS for study in history.studies if study.INS}
    noted["patients"] = sorted(patients)
    noted["emergency"] = bool(patients) and await run(access.policy.emergency_among, principal, patients)
    base = access.server.base_url
    bundle = await run(_bundle, base, search, history.studies, history.total)
    return _fhir(bundle)


async def read_imaging_study(request: Request) -> Response:
    access = access_of(request)
    principal = request.scope["state"]["principal"]
    noted = audit_of(request.scope)
    study = request.path_params["study"]
    noted["study"] = study
    allowed = await run(access.policy.check_study, principal, study)
    noted["patient"], noted["emergency"] = allowed.patient, allowed.emergency
    found = await run(study_summaries, _registry(request), [study])
    if not found:  # removed between the decision and the read
        raise NotFound(f"study {escape(study, 64)} not found")
    base = access.server.base_url
    resource = await run(imaging_study, found[0], base + urls.DICOMWEB, STUDY_ZONE)
    return _fhir(resource)


def _bundle(base: str, search: ImagingStudySearch, studies: list[StudySummary], total: int) -> Any:
    dicomweb = base + urls.DICOMWEB
    entries = []
    for study in studies:
        url = base + urls.FHIR_IMAGING_STUDY.format(study=study.StudyInstanceUID)
        entries.append((url, imaging_study(study, dicomweb, STUDY_ZONE)))
    links = [("self", _page_url(base, search, search.offset))]
    if search.offset + search.count < total:
        links.append(("next", _page_url(base, search, search.offset + search.count)))
    if search.offset > 0:
        links.append(("previous", _page_url(base, search, max(0, search.offset - search.count))))
    return searchset(entries, total, links)


def _page_url(base: str, search: ImagingStudySearch, offset: int) -> str:
    """The search as this server understood it (not echoed from the request), at ``offset``."""
    params = [("patient.identifier", f"{NIR_SYSTEM}|{search.patient}")]
    low, high = search.dates
    if low:
        params.append(("started", f"ge{low[:4]}-{low[4:6]}-{low[6:]}"))
    if high:
        params.append(("started", f"le{high[:4]}-{high[4:6]}-{high[6:]}"))
    if search.modalities:
        params.append(("modality", ",".join(search.modalities)))
    params += [("_count", str(search.count)), ("_getpagesoffset", str(offset))]
    return f"{base}{urls.FHIR_IMAGING_STUDIES}?{urlencode(params, safe='|:,')}"


ROUTES = [
    Route(urls.FHIR_IMAGING_STUDIES, search_imaging_studies, methods=["GET"]),
    Route(urls.FHIR_IMAGING_STUDY, read_imaging_study, methods=["GET"]),
]
