"""Principals are (issuer, subject); links are made only for what exists and the maker may see,
and their URL comes from the configuration."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from gateway.access.identity import Principal, grantee_key
from gateway.errors import Forbidden
from tests.security.conftest import ALICE, PORTAL, PSC
from tests.security.test_routes import MISSING, doctor, patient


def test_a_patient_whose_subject_equals_a_professionals_rpps_cannot_touch_their_links(site):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    made = site.post("/api/links", {"StudyInstanceUID": site.studies["alice-1"]}, doctor(site)).json()
    impostor = site.token(PORTAL, sub="10001", ins="2900275654321")  # another patient, same subject
    assert site.get("/api/links", impostor).json() == []
    assert site.delete(f"/api/links/{made['id']}", impostor).status_code == 404
    assert [link["id"] for link in site.get("/api/links", doctor(site)).json()] == [made["id"]]


def test_a_grant_names_its_grantee_within_one_issuer(site):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    study = site.studies["alice-1"]
    same = Principal(role="professional", actor="10001", issuer=PSC)
    assert site.access.policy.check_study(same, study).patient == ALICE
    elsewhere = Principal(role="professional", actor="10001", issuer="https://other-idp.test")
    with pytest.raises(Forbidden):
        site.access.policy.check_study(elsewhere, study)


def test_a_grant_lists_the_issuer_it_names_the_grantee_within(site):
    created = site.post("/api/grants", {"grantee": "org:750000001"}, patient(site)).json()
    assert created["grantee"] == "org:750000001" and created["issuer"] == PSC
    refused = site.post("/api/grants", {"grantee": "10001", "issuer": "https://other.test"}, patient(site))
    assert refused.status_code == 400 and "issuer" in refused.text


def test_grants_written_before_issuers_are_given_the_one_professional_issuer(site):
    with site.access.store.db.transaction() as conn:
        conn.execute(
            "INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?)", ("old", ALICE, "pro:10001", 0.0, None, None)
        )
    assert site.access.store.qualify_grantees(PSC) == 1
    assert ALICE in site.access.store.granted_patients((grantee_key("pro", PSC, "10001"),), 1.0)


def test_a_link_url_comes_from_the_configuration_not_the_host_header(site):
    response = site.client.request(
        "POST",
        "/api/links",
        json={"StudyInstanceUID": site.studies["alice-1"]},
        headers={"Authorization": f"Bearer {patient(site)}", "Host": "evil.example"},
    )
    assert response.status_code == 201, response.text
    assert urlsplit(response.json()["url"]).netloc == "127.0.0.1:8080"  # server.host and port


@pytest.mark.parametrize(("who", "status"), [("patient", 404), ("professional", 403)])
def test_no_link_is_made_for_a_study_that_does_not_exist(site, who, status):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    token = patient(site) if who == "patient" else doctor(site)
    assert site.post("/api/links", {"StudyInstanceUID": MISSING}, token).status_code == status
    assert site.get("/api/links", token).json() == []


def test_a_link_with_a_null_expiry_gets_the_default_one(site):
    body = {"StudyInstanceUID": site.studies["alice-1"], "expires_in": None}
    response = site.post("/api/links", body, patient(site))
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("who", ["patient", "professional"])
def test_a_refusal_does_not_echo_a_huge_uid(site, who):
    token = patient(site) if who == "patient" else doctor(site)
    response = site.get("/dicom-web/studies/" + "9" * 60_000 + "/metadata", token)
    assert response.status_code in (403, 404) and len(response.content) < 400


def test_a_link_to_a_study_without_ins_opens_that_study(site):
    made = site.post("/api/links", {"StudyInstanceUID": site.studies["nobody"]}, site.token(PSC, sub="x"))
    assert made.status_code == 403  # a professional cannot: no consent covers a study without INS
    # A link made where no INS is needed (the open demo) names its study: that is enough to open it.
    _, secret = site.access.store.add_link(site.studies["nobody"], None, "demo", "open", 4e9)
    cookie = site.client.get(f"/link/{secret}").headers["set-cookie"].split(";")[0]
    url = f"/dicom-web/studies/{site.studies['nobody']}/metadata"
    assert site.client.get(url, headers={"Cookie": cookie}).status_code == 200
