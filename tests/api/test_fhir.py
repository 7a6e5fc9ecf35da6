"""GET /fhir/ImagingStudy through the app: a patient's imaging history as validated FHIR R4,
filtered by the access policy, paged, audited; on both registry backends."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome

from tests.access import conftest as access
from tests.access.conftest import ALICE, BOB, PORTAL, PSC, Site
from tests.registry.test_history import instance, put

NIR = "urn:oid:1.2.250.1.213.1.4.8"
MR, CR = "1.2.826.0.1.10", "1.2.826.0.1.11"  # Alice's studies at another source
site = access.site  # the access suite's fixture: issuers, patients, grants


def patient(at: Site, ins: str = ALICE) -> str:
    return at.token(PORTAL, sub=f"patient-{ins}", ins=ins)


def doctor(at: Site) -> str:
    return at.token(PSC, sub="10001", organization="750000001", roles=["radiologist"])


@pytest.fixture
def world(site: Site) -> Site:
    """The access site, and two more studies of Alice at a PACS that knows her as LOCAL-42."""
    registry = site.access.policy.registry
    put(registry, "pacs", [
        instance(MR, MR + ".1", 1, patient_id="LOCAL-42", ins=ALICE, date="20230105", modality="MR",
                 body_part="BRAIN", study_description="IRM CEREBRALE"),
        instance(CR, CR + ".1", 1, patient_id="LOCAL-42", ins=ALICE, date="20200101", modality="CR",
                 study_description="RADIO THORAX"),
    ])  # fmt: skip
    return site


def search(at: Site, query: str, token: str | None):
    return at.get(f"/fhir/ImagingStudy?{query}", token)


def bundle(response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/fhir+json"
    Bundle.model_validate_json(response.content)  # every resource in it validated too
    return response.json()


def ids(body: dict) -> list[str]:
    return [entry["resource"]["id"] for entry in body.get("entry", [])]


def test_a_patient_lists_their_imaging_history_across_sources_as_a_searchset(world):
    body = bundle(search(world, f"patient.identifier={NIR}|{ALICE}", patient(world)))
    assert body["total"] == 4
    assert ids(body) == [world.studies["alice-1"], world.studies["alice-2"], MR, CR]
    base = world.access.server.base_url
    for entry in body["entry"]:
        study = ImagingStudy.model_validate(entry["resource"])
        assert entry["fullUrl"] == f"{base}/fhir/ImagingStudy/{study.id}"
        assert study.subject.identifier.value == ALICE and study.subject.identifier.system == NIR
        assert study.contained[0].address == f"{base}/dicom-web"
    mr = body["entry"][2]["resource"]
    assert mr["series"][0]["bodySite"]["code"] == "12738006" and mr["modality"][0]["code"] == "MR"
    assert [link["relation"] for link in body["link"]] == ["self"]


def test_a_professional_sees_a_patient_only_once_granted_and_never_hidden_studies(world):
    token = doctor(world)
    refused = search(world, f"patient.identifier={NIR}|{ALICE}", token)
    assert bundle(refused)["total"] == 0
    # The same answer as for a patient who does not exist, or another who granted nothing.
    for other in ("1999999999999", BOB):
        answer = search(world, f"patient.identifier={NIR}|{other}", token)
        assert answer.content.replace(other.encode(), ALICE.encode()) == refused.content
    assert world.post("/api/grants", {"grantee": "10001"}, patient(world)).status_code == 201
    assert bundle(search(world, f"patient.identifier={ALICE}", token))["total"] == 4
    hidden = world.post("/api/hidden", {"StudyInstanceUID": world.studies["alice-2"]}, patient(world))
    assert hidden.status_code == 201
    body = bundle(search(world, f"patient.identifier={ALICE}", token))
    assert world.studies["alice-2"] not in ids(body) and body["total"] == 3
    assert bundle(search(world, f"patient.identifier={BOB}", patient(world)))["total"] == 0


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("started=ge2023-01-01", ["alice-1", "alice-2", MR]),
        ("started=lt2024&started=ge2020-01-02", [MR]),
        ("modality=CR,MR", [MR, CR]),
        ("modality=http://dicom.nema.org/resources/ontology/DCM|CT&started=le2023", []),
    ],
)
def test_started_and_modality_narrow_the_search(world, query, expected):
    body = bundle(search(world, f"patient.identifier={ALICE}&{query}", patient(world)))
    assert ids(body) == [world.studies.get(uid, uid) for uid in expected]
    assert body["total"] == len(expected)


def test_pages_link_to_each_other(world):
    token = patient(world)
    first = bundle(search(world, f"patient.identifier={ALICE}&_count=3", token))
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert len(first["entry"]) == 3 and first["total"] == 4 and "previous" not in links
    following = urlsplit(links["next"])
    second = bundle(world.get(f"{following.path}?{following.query}", token))
    assert ids(second) == [CR] and second["total"] == 4
    links = {link["relation"]: link["url"] for link in second["link"]}
    assert "next" not in links and "_getpagesoffset=0" in links["previous"]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        (f"patient.identifier={ALICE}&_sort=-started&foo=1", "'_sort', 'foo'"),
        ("started=2024", "patient.identifier: required"),
        (f"patient.identifier={ALICE}&_count=1000", "_count: an integer from 1 to 100"),
    ],
)
def test_a_search_it_cannot_answer_is_a_400_with_an_operation_outcome(world, query, named):
    response = search(world, query, patient(world))
    assert response.status_code == 400 and response.headers["content-type"] == "application/fhir+json"
    outcome = OperationOutcome.model_validate_json(response.content)
    assert named in (outcome.issue[0].diagnostics or "")


def test_a_search_is_refused_without_credentials(world):
    assert search(world, f"patient.identifier={ALICE}", None).status_code == 401


def test_the_audit_record_names_the_patients_the_bundle_carried(world):
    bundle(search(world, f"patient.identifier={ALICE}", patient(world)))
    record = world.records()[-1]
    assert (record.action, record.patients, record.status) == ("fhir.search", (ALICE,), 200)
    world.post("/api/grants", {"grantee": "10001"}, patient(world))
    bundle(search(world, f"patient.identifier={BOB}", doctor(world)))
    record = world.records()[-1]
    assert record.patients == () and record.action == "fhir.search"


def test_one_imaging_study_is_read_by_its_uid_under_the_policy(world):
    uid = world.studies["alice-1"]
    response = world.get(f"/fhir/ImagingStudy/{uid}", patient(world))
    assert response.status_code == 200 and response.headers["content-type"] == "application/fhir+json"
    study = ImagingStudy.model_validate_json(response.content)
    assert study.id == uid and study.numberOfInstances == 2
    record = world.records()[-1]
    assert (record.action, record.study, record.patients) == ("fhir.read", uid, (ALICE,))
    refused = world.get(f"/fhir/ImagingStudy/{uid}", doctor(world))
    missing = world.get("/fhir/ImagingStudy/1.2.826.0.1.999", doctor(world))
    assert refused.status_code == missing.status_code == 403
    assert refused.text.replace(uid, "<uid>") == missing.text.replace("1.2.826.0.1.999", "<uid>")
