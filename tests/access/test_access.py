"""Each role and each refusal of the access policy, through the HTTP app (QIDO, WADO, the API)."""

from __future__ import annotations

import time

import pytest

from tests.access.conftest import ALICE, BOB, PORTAL, PSC, Site


def study_uids(response) -> set[str]:
    assert response.status_code == 200, response.text
    return {item["0020000D"]["Value"][0] for item in response.json()}


def patient(site: Site, ins: str = ALICE) -> str:
    return site.token(PORTAL, sub=f"patient-{ins}", ins=ins)


def doctor(site: Site, rpps: str = "10001", org: str = "750000001", roles: list[str] | None = None) -> str:
    return site.token(PSC, sub=rpps, organization=org, roles=roles or ["radiologist"])


def first_frame_url(site: Site, name: str, token: str) -> str:
    uid = site.studies[name]
    response = site.get(f"/dicom-web/studies/{uid}/instances", token)
    item = response.json()[0]
    return (
        f"/dicom-web/studies/{uid}/series/{item['0020000E']['Value'][0]}"
        f"/instances/{item['00080018']['Value'][0]}/frames/1"
    )


# -- authentication --------------------------------------------------------------------------------


def test_no_credentials_get_401_with_a_bearer_challenge(site):
    response = site.get("/dicom-web/studies")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_an_expired_token_is_refused_and_says_so(site):
    token = site.token(PSC, lifetime=-120, sub="10001")  # past the 30 s leeway
    response = site.get("/dicom-web/studies", token)
    assert response.status_code == 401 and "expired" in response.text


def test_a_token_for_another_audience_is_refused(site):
    token = site.token(PSC, sub="10001", aud="someone-else")
    response = site.get("/dicom-web/studies", token)
    assert response.status_code == 401 and "aud" in response.text


def test_a_token_from_an_unknown_issuer_is_refused(site):
    token = site.token("https://evil.test", sub="10001")
    assert site.get("/dicom-web/studies", token).status_code == 401


def test_a_token_signed_by_another_key_is_refused(site):
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = time.time()
    claims = {"iss": PSC, "aud": "gateway", "sub": "10001", "exp": now + 60}
    token = jwt.encode(claims, other, algorithm="RS256", headers={"kid": "k1"})
    response = site.get("/dicom-web/studies", token)
    assert response.status_code == 401 and "Signature" in response.text


def test_a_patient_token_without_ins_is_refused(site):
    token = site.token(PORTAL, sub="patient-x")
    response = site.get("/dicom-web/studies", token)
    assert response.status_code == 401 and "INS" in response.text


# -- patients --------------------------------------------------------------------------------------


def test_a_patient_sees_only_their_own_studies(site):
    found = study_uids(site.get("/dicom-web/studies", patient(site)))
    assert found == {site.studies["alice-1"], site.studies["alice-2"]}


def test_a_patient_asking_for_another_patients_study_gets_404(site):
    url = f"/dicom-web/studies/{site.studies['bob']}/metadata"
    assert site.get(url, patient(site)).status_code == 404


# -- professionals and grants ------------------------------------------------------------------------


def test_a_professional_without_a_grant_sees_nothing_and_gets_403_on_retrieve(site):
    assert study_uids(site.get("/dicom-web/studies", doctor(site))) == set()
    response = site.get(f"/dicom-web/studies/{site.studies['alice-1']}/metadata", doctor(site))
    assert response.status_code == 403 and "grant" in response.text


def test_a_grant_to_the_professional_opens_that_patients_studies_only(site):
    response = site.post("/api/grants", {"grantee": "10001"}, patient(site))
    assert response.status_code == 201, response.text
    found = study_uids(site.get("/dicom-web/studies", doctor(site)))
    assert found == {site.studies["alice-1"], site.studies["alice-2"]}
    frame_url = first_frame_url(site, "alice-1", doctor(site))
    assert site.get(frame_url, doctor(site), headers={"Accept": "*/*"}).status_code == 200


def test_a_grant_to_an_organization_covers_its_professionals(site):
    site.post("/api/grants", {"grantee": "org:750000001"}, patient(site))
    colleague = doctor(site, rpps="10002", org="750000001")
    stranger = doctor(site, rpps="10003", org="690000001")
    assert site.studies["alice-1"] in study_uids(site.get("/dicom-web/studies", colleague))
    assert study_uids(site.get("/dicom-web/studies", stranger)) == set()


def test_a_revoked_grant_stops_access_at_once(site):
    grant = site.post("/api/grants", {"grantee": "10001"}, patient(site)).json()
    url = f"/dicom-web/studies/{site.studies['alice-1']}/metadata"
    assert site.get(url, doctor(site)).status_code == 200
    assert site.delete(f"/api/grants/{grant['id']}", patient(site)).status_code == 204
    assert site.get(url, doctor(site)).status_code == 403


def test_only_a_patient_can_grant(site):
    response = site.post("/api/grants", {"grantee": "10002"}, doctor(site))
    assert response.status_code == 403


# -- hiding ----------------------------------------------------------------------------------------------


def test_a_hidden_study_disappears_for_everyone_else_but_not_for_the_patient(site):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    hidden = site.studies["alice-2"]
    assert site.post("/api/hidden", {"StudyInstanceUID": hidden}, patient(site)).status_code == 201
    assert hidden not in study_uids(site.get("/dicom-web/studies", doctor(site)))
    # The professional's one refusal: the same as for a study that does not exist (tests/security).
    assert site.get(f"/dicom-web/studies/{hidden}/metadata", doctor(site)).status_code == 403
    assert hidden in study_uids(site.get("/dicom-web/studies", patient(site)))
    assert site.delete(f"/api/hidden/{hidden}", patient(site)).status_code == 204
    assert hidden in study_uids(site.get("/dicom-web/studies", doctor(site)))


def test_a_patient_cannot_hide_someone_elses_study(site):
    response = site.post("/api/hidden", {"StudyInstanceUID": site.studies["bob"]}, patient(site))
    assert response.status_code == 404


# -- emergency access --------------------------------------------------------------------------------------


def test_emergency_access_needs_an_emergency_role_and_a_reason(site):
    body = {"patient": ALICE, "reason": "unconscious patient, suspected stroke"}
    assert site.post("/api/emergency", body, doctor(site)).status_code == 403
    samu = doctor(site, rpps="20001", roles=["samu"])
    assert site.post("/api/emergency", {"patient": ALICE, "reason": ""}, samu).status_code == 400
    assert site.post("/api/emergency", body, samu).status_code == 201
    assert study_uids(site.get("/dicom-web/studies", samu)) == {
        site.studies["alice-1"],
        site.studies["alice-2"],
    }


def test_emergency_access_is_flagged_in_the_audit_and_visible_to_the_patient(site):
    samu = doctor(site, rpps="20001", roles=["samu"])
    site.post("/api/emergency", {"patient": ALICE, "reason": "cardiac arrest, previous CT needed"}, samu)
    assert site.get(f"/dicom-web/studies/{site.studies['alice-1']}/metadata", samu).status_code == 200
    emergencies = site.get("/api/emergency", patient(site)).json()
    assert [e["actor"] for e in emergencies] == ["20001"]
    history = site.get("/api/audit", patient(site)).json()
    flagged = [r for r in history if r.get("emergency")]
    assert {r["action"] for r in flagged} == {"emergency.open", "metadata"}


def test_emergency_access_does_not_reach_hidden_studies(site):
    site.post("/api/hidden", {"StudyInstanceUID": site.studies["alice-2"]}, patient(site))
    samu = doctor(site, rpps="20001", roles=["samu"])
    site.post("/api/emergency", {"patient": ALICE, "reason": "unconscious patient, suspected stroke"}, samu)
    assert study_uids(site.get("/dicom-web/studies", samu)) == {site.studies["alice-1"]}


def test_an_emergency_professional_without_emergency_access_is_told_how_to_open_it(site):
    samu = doctor(site, rpps="20001", roles=["samu"])
    response = site.get(f"/dicom-web/studies/{site.studies['alice-1']}/metadata", samu)
    assert response.status_code == 403 and "/api/emergency" in response.text


# -- audit -------------------------------------------------------------------------------------------------


def test_every_request_leaves_exactly_one_record_refusals_included(site):
    before = len(site.records())
    site.get("/dicom-web/studies")  # 401
    site.get("/dicom-web/studies", patient(site))  # 200
    site.get(f"/dicom-web/studies/{site.studies['bob']}/metadata", patient(site))  # 404
    site.get(f"/dicom-web/studies/{site.studies['bob']}/metadata", doctor(site))  # 403
    records = site.records()[before:]
    assert [(r.action, r.outcome, r.status) for r in records] == [
        ("query", "denied", 401),
        ("query", "success", 200),
        ("metadata", "denied", 404),
        ("metadata", "denied", 403),
    ]
    assert records[3].study == site.studies["bob"] and records[3].actor == "10001"
    assert "grant" in (records[3].reason or "")


def test_a_retrieve_record_names_the_source_and_the_bytes_sent(site):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    url = first_frame_url(site, "alice-1", doctor(site))
    response = site.get(url, doctor(site), headers={"Accept": "*/*"})
    record = site.records()[-1]
    assert record.action == "retrieve" and record.source == "archive"
    assert record.bytes_sent == len(response.content) and record.patient == ALICE


def test_a_patient_reads_only_their_own_access_history(site):
    site.get("/dicom-web/studies", patient(site, BOB))
    site.get("/dicom-web/studies", patient(site))
    history = site.get("/api/audit", patient(site)).json()
    assert history and {r["patient"] for r in history} == {ALICE}
    assert site.get("/api/audit", doctor(site)).status_code == 403


def test_the_audit_table_refuses_changes(site):
    from gateway.errors import RegistryError

    site.get("/dicom-web/studies", patient(site))
    before = site.records()
    for statement in ("UPDATE audit SET actor='x'", "DELETE FROM audit"):
        with pytest.raises(RegistryError, match="append-only"):
            with site.access.store.db.transaction() as conn:
                conn.execute(statement)
    assert site.records() == before


def test_a_burst_of_1000_requests_leaves_1000_records(site):
    import anyio
    import httpx

    token = patient(site)

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=site.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            statuses: list[int] = []

            async def one() -> None:
                response = await http.get("/dicom-web/studies", headers={"Authorization": f"Bearer {token}"})
                statuses.append(response.status_code)

            async with anyio.create_task_group() as group:
                for _ in range(1000):
                    group.start_soon(one)
            return statuses

    before = site.access.store.audit_count()
    statuses = anyio.run(burst)
    assert statuses.count(200) == 1000
    site.access.audit.flush()
    assert site.access.store.audit_count() - before == 1000


# -- headers -----------------------------------------------------------------------------------------------


def test_responses_carry_security_headers_and_a_request_id(site):
    response = site.get("/dicom-web/studies", patient(site))
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert len(response.headers["x-request-id"]) == 16
    assert site.records()[-1].request_id == response.headers["x-request-id"]


def test_the_access_history_exports_as_fhir_and_as_dicom_audit_messages(site):
    import xml.etree.ElementTree as ElementTree

    site.get("/dicom-web/studies", patient(site))
    fhir = site.get("/api/audit?format=fhir", patient(site))
    assert fhir.headers["content-type"].startswith("application/fhir+json")
    bundle = fhir.json()
    assert bundle["resourceType"] == "Bundle" and bundle["entry"]
    assert {e["resource"]["resourceType"] for e in bundle["entry"]} == {"AuditEvent"}
    dicom = site.get("/api/audit?format=dicom", patient(site))
    root = ElementTree.fromstring(dicom.content)
    # The FHIR export's own reading is in the history the DICOM export gives.
    assert root.tag == "AuditMessages" and len(root) == len(bundle["entry"]) + 1
    assert site.get("/api/audit?format=pdf", patient(site)).status_code == 400


def test_a_cors_preflight_from_a_configured_origin_is_answered_without_credentials(site):
    headers = {"Origin": "https://viewer.example", "Access-Control-Request-Method": "GET"}
    response = site.client.request("OPTIONS", "/dicom-web/studies", headers=headers)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "https://viewer.example"
    assert "Authorization" in response.headers["access-control-allow-headers"]


def test_cors_headers_go_to_configured_origins_only(site):
    allowed = site.get("/dicom-web/studies", patient(site), headers={"Origin": "https://viewer.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://viewer.example"
    assert "X-Request-ID" in allowed.headers["access-control-expose-headers"]
    other = site.get("/dicom-web/studies", patient(site), headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = site.client.request(
        "OPTIONS", "/dicom-web/studies", headers={"Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_a_study_asked_for_before_it_is_indexed_is_seen_once_it_is():
    """A missing study is not remembered: a viewer that asks before the harvest commits sees the
    study on its next request after it, not 10 s later."""

    class Index:
        held: dict[str, tuple[bool, str | None]] = {}

        def study_patient(self, study: str) -> tuple[bool, str | None]:
            return self.held.get(study, (False, None))

    from gateway.access.policy import Policy

    index = Index()
    policy = Policy(store=None, registry=index)  # type: ignore[arg-type]
    assert policy.study_patient("1.2.3") == (False, None)
    index.held["1.2.3"] = (True, "1234567890123")
    assert policy.study_patient("1.2.3") == (True, "1234567890123")
    index.held.clear()  # a found study is remembered for a while (its patient does not change)
    assert policy.study_patient("1.2.3") == (True, "1234567890123")
