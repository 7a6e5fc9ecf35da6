"""FHIR ImagingStudy, its Endpoint, searchset Bundles and the search parameters, without I/O:
every resource is validated again from its JSON by the FHIR R4 models."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome

from gateway.errors import RequestError
from gateway.fhir.bodysite import body_site, term_of_code
from gateway.fhir.imagingstudy import imaging_study, operation_outcome, searchset
from gateway.fhir.search import ImagingStudySearch, parse_search
from gateway.registry.history import SeriesSummary, StudySummary

DICOMWEB = "https://imaging.example/dicom-web"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PARIS = ZoneInfo("Europe/Paris")


def summary(**changes) -> StudySummary:
    fields = dict(
        StudyInstanceUID="1.2.826.0.1.1",
        StudyDate="20240601",
        StudyTime="101530.25",
        StudyDescription="CT THORAX",
        AccessionNumber="ACC1",
        PatientID="A-1",
        IssuerOfPatientID="SITE",
        INS="1800175123456",
        instances=4,
        series=(
            SeriesSummary("1.2.826.0.1.1.1", 1, "CT", "Axial", "CHEST", 3),
            SeriesSummary("1.2.826.0.1.1.2", 2, "SR", None, "GENOU", 1),
        ),
        sources=("a",),
    )
    return StudySummary(**(fields | changes))


def validated(resource) -> dict:
    """The resource's JSON, parsed again by its FHIR model (as a client would)."""
    text = resource.model_dump_json()
    type(resource).model_validate_json(text)
    return orjson.loads(text)


def test_an_imaging_study_carries_uid_patient_series_and_endpoint():
    body = validated(imaging_study(summary(), DICOMWEB, PARIS))
    assert body["id"] == "1.2.826.0.1.1" and body["status"] == "available"
    uid = {"use": "official", "system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.1"}
    assert uid in body["identifier"]
    assert body["identifier"][1]["value"] == "ACC1"
    ins = {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "1800175123456"}
    assert body["subject"]["identifier"] == ins
    assert body["started"] == "2024-06-01T10:15:30+02:00"  # Paris in summer
    assert body["modality"] == [{"system": DCM, "code": "CT"}, {"system": DCM, "code": "SR"}]
    assert (body["numberOfSeries"], body["numberOfInstances"]) == (2, 4)
    assert body["description"] == "CT THORAX"
    (endpoint,) = body["contained"]
    assert body["endpoint"] == [{"reference": "#dicomweb"}] and endpoint["id"] == "dicomweb"
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs" and endpoint["address"] == DICOMWEB
    chest, other = body["series"]
    assert chest["uid"] == "1.2.826.0.1.1.1" and chest["number"] == 1
    assert chest["modality"] == {"system": DCM, "code": "CT"} and chest["numberOfInstances"] == 3
    assert chest["bodySite"] == {"system": "http://snomed.info/sct", "code": "816094009", "display": "Chest"}
    assert other["bodySite"] == {"display": "GENOU"}  # not a defined term: kept as text


@pytest.mark.parametrize(
    ("date", "time", "zone", "started"),
    [
        ("20240115", "0830", PARIS, "2024-01-15T08:30:00+01:00"),
        ("20240115", "083000", None, "2024-01-15"),  # no zone: the date alone
        ("20240115", None, PARIS, "2024-01-15"),
        ("20240115", "256100", PARIS, "2024-01-15"),
        ("2024", "0830", PARIS, None),
        (None, None, PARIS, None),
    ],
)
def test_started_has_a_time_only_with_a_zone(date, time, zone, started):
    body = validated(imaging_study(summary(StudyDate=date, StudyTime=time), DICOMWEB, zone))
    assert body.get("started") == started


def test_a_study_without_ins_names_its_local_patient():
    body = validated(imaging_study(summary(INS=None, IssuerOfPatientID="1.2.250.1.71.4.2"), DICOMWEB))
    assert body["subject"]["identifier"] == {"system": "urn:oid:1.2.250.1.71.4.2", "value": "A-1"}
    body = validated(imaging_study(summary(INS=None), DICOMWEB))
    assert body["subject"]["identifier"] == {"value": "A-1"}  # "SITE" is no OID: no system


def test_a_series_without_modality_or_number_still_validates():
    lone = SeriesSummary("1.2.3.4", None, None, None, None, 0)
    body = validated(imaging_study(summary(series=(lone,), instances=0, StudyDescription=None), DICOMWEB))
    other = {"system": DCM, "code": "OT"}
    assert body["series"][0] == {"uid": "1.2.3.4", "modality": other, "numberOfInstances": 0}
    assert "modality" not in body and "description" not in body


def test_a_searchset_has_its_total_links_and_entries():
    studies = [imaging_study(summary(), DICOMWEB, PARIS)]
    links = [("self", "https://g/fhir/ImagingStudy?x=1"), ("next", "https://g/fhir/ImagingStudy?x=2")]
    body = validated(searchset([("https://g/fhir/ImagingStudy/1.2.826.0.1.1", studies[0])], 7, links))
    assert body["type"] == "searchset" and body["total"] == 7
    assert [link["relation"] for link in body["link"]] == ["self", "next"]
    assert body["entry"][0]["search"] == {"mode": "match"}
    ImagingStudy.model_validate(body["entry"][0]["resource"])
    Bundle.model_validate(body)


def test_an_operation_outcome_says_what_was_wrong():
    body = validated(operation_outcome("unknown search parameter(s) 'foo'"))
    OperationOutcome.model_validate(body)
    (issue,) = body["issue"]
    assert (issue["severity"], issue["code"]) == ("error", "invalid")
    assert issue["diagnostics"] == "unknown search parameter(s) 'foo'"


def test_body_parts_map_to_snomed_and_codes_back():
    assert body_site("chest")["code"] == "816094009"
    assert term_of_code("SCT", "816094009") == "CHEST"
    assert term_of_code("SCT", "51185008") == "CHEST"  # the code of older editions
    assert term_of_code("SRT", "T-D3000") == "CHEST"
    assert term_of_code("LN", "816094009") is None


P = "patient.identifier=urn:oid:1.2.250.1.213.1.4.8|1800175123456"
INS = "1800175123456"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (P, ImagingStudySearch(INS)),
        ("subject:Patient.identifier=1800175123456", ImagingStudySearch(INS)),
        (P + "&started=ge2024-01-01", ImagingStudySearch(INS, ("20240101", ""))),
        (P + "&started=le2024-02", ImagingStudySearch(INS, ("", "20240229"))),
        (P + "&started=2023", ImagingStudySearch(INS, ("20230101", "20231231"))),
        (P + "&started=gt2023-12-31&started=lt2024-02-01", ImagingStudySearch(INS, ("20240101", "20240131"))),
        (P + f"&modality={DCM}|CT,MR", ImagingStudySearch(INS, modalities=("CT", "MR"))),
        (P + "&_count=100&_getpagesoffset=40", ImagingStudySearch(INS, count=100, offset=40)),
    ],
    ids=["patient", "subject", "ge", "le month", "eq year", "gt and lt", "modalities", "paging"],
)
def test_search_parameters_are_understood(query, expected):
    pairs = [tuple(part.split("=", 1)) for part in query.split("&")]
    assert parse_search(pairs) == expected


@pytest.mark.parametrize(
    ("query", "named"),
    [
        (P + "&foo=1&_sort=date", "'_sort', 'foo'"),
        ("started=2024", "patient.identifier: required"),
        ("patient.identifier=http://other|1", "the system must be the INS"),
        ("patient.identifier=|12 34", "letters and digits"),
        (P + "&" + P, "given 2 times"),
        (P + "&_count=101", "_count: an integer from 1 to 100"),
        (P + "&_count=0", "_count"),
        (P + "&_getpagesoffset=-1", "_getpagesoffset"),
        (P + "&started=ne2024", "prefix 'ne'"),
        (P + "&started=2024-01-01T10:00:00Z", "not a date"),
        (P + "&started=2024-02-30", "not a date"),
        (P + "&modality=ct", "not a DICOM modality code"),
        (P + "&modality=http://loinc.org|CT", "the system must be"),
        (P + "&modality=" + "A" * 300, "longer than 256"),
        ("patient.identifier=1&subject:Patient.identifier=2", "different patients"),
    ],
)
def test_a_search_the_server_cannot_answer_is_refused_naming_what(query, named):
    pairs = [tuple(part.split("=", 1)) for part in query.split("&")]
    with pytest.raises(RequestError) as raised:
        parse_search(pairs)
    assert named in raised.value.message
