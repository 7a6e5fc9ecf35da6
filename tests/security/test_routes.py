"""Each trust invariant attacked on every route where it applies (tests/security/routes.py), on
both registry backends: no oracle, consent checked at use, one audit record per request."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from tests.security.conftest import ALICE, BOB, CLIENTS, PORTAL, PSC, Site
from tests.security.routes import TABLE, Route, Target, app_routes, of_kind, route_id

MISSING = "1.2.826.0.1.999"  # a UID no source holds


def patient(site: Site, ins: str = ALICE) -> str:
    return site.token(PORTAL, sub=f"patient-{ins}", ins=ins)


def doctor(site: Site, rpps: str = "10001") -> str:
    return site.token(PSC, sub=rpps, organization="750000001", roles=["radiologist"])


def ris(site: Site, client: str = "ris-1") -> str:
    """A system client (an EHR or a RIS) of the doctor's organization."""
    return site.token(CLIENTS, sub=client, organization="750000001")


def targets(site: Site) -> dict[str, Target]:
    """Each study's UIDs: a real series and instance fill the templates."""
    rows = site.access.policy.registry.query(
        "SELECT se.StudyInstanceUID, i.SeriesInstanceUID, i.SOPInstanceUID FROM instances i "
        "JOIN series se ON se.SeriesInstanceUID = i.SeriesInstanceUID"
    )
    found = {row[0]: Target(row[0], row[1], row[2]) for row in rows}
    return {name: found[uid] for name, uid in site.studies.items()} | {"missing": Target(MISSING)}


def call(site: Site, route: Route, target: Target, token: str | None = None, cookie: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if cookie:
        headers["Cookie"] = cookie
    body = target.body(route)
    content = orjson.dumps(body) if body is not None else None
    return site.client.request(route.method, target.url(route), headers=headers, content=content)


def link_cookie(site: Site, name: str, token: str) -> str:
    made = site.post("/api/links", {"StudyInstanceUID": site.studies[name]}, token)
    assert made.status_code == 201, made.text
    opened = site.client.get(urlsplit(made.json()["url"]).path)
    assert opened.status_code == 303, opened.text
    return opened.headers["set-cookie"].split(";")[0]


def answer(response: Any, uid: str) -> tuple[int, bytes, dict[str, str]]:
    """A response as the caller sees it, with the study's UID (which the caller sent) blanked."""
    varying = {"x-request-id", "content-length", "date"}
    headers = {k: v.replace(uid, "<uid>") for k, v in response.headers.items() if k not in varying}
    return response.status_code, response.content.replace(uid.encode(), b"<uid>"), headers


def test_every_route_is_classified(site):
    """A route added to the application must be added to the table (and so to every attack)."""
    table = {(route.method, urlsplit(route.path).path) for route in TABLE}
    assert app_routes(site.client.app) == table


# -- one answer for "you may not see it" ----------------------------------------------------------

CALLERS = ["professional", "system", "patient", "link"]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("route", of_kind("study", "study-api"), ids=route_id)
def test_a_study_one_may_not_see_gets_one_answer_whether_it_exists_is_hidden_or_not_granted(
    site, route, caller
):
    assert site.post("/api/grants", {"grantee": "10001"}, patient(site)).status_code == 201
    cookie = link_cookie(site, "alice-1", patient(site))
    hidden = site.post("/api/hidden", {"StudyInstanceUID": site.studies["alice-2"]}, patient(site))
    assert hidden.status_code == 201
    tokens = {"professional": doctor(site), "system": ris(site), "patient": patient(site), "link": None}
    token = tokens[caller]
    unseen = ["missing", "bob", "nobody"] + ([] if caller == "patient" else ["alice-2"])
    found = targets(site)
    answers = {
        name: answer(call(site, route, found[name], token, cookie), found[name].study) for name in unseen
    }
    first = answers["missing"]
    assert first[0] in (401, 403, 404), first
    for name, seen in answers.items():
        assert seen == first, f"{name} answers differently from a study that does not exist"


# -- consent is checked at use --------------------------------------------------------------------


@pytest.mark.parametrize("route", of_kind("study"), ids=route_id)
def test_a_link_made_under_a_grant_stops_when_the_grant_is_revoked(site, route):
    grant = site.post("/api/grants", {"grantee": "10001"}, patient(site)).json()
    cookie = link_cookie(site, "alice-1", doctor(site))
    target = targets(site)["alice-1"]
    before = call(site, route, target, cookie=cookie)
    assert before.status_code == 200, before.text
    assert site.delete(f"/api/grants/{grant['id']}", patient(site)).status_code == 204
    after = call(site, route, target, cookie=cookie)
    assert after.status_code == 404, after.text
    # The same answer as for a study the link never covered.
    other = targets(site)["bob"]
    assert answer(after, target.study) == answer(call(site, route, other, cookie=cookie), other.study)


def test_a_link_made_under_a_grant_finds_nothing_in_qido_once_the_grant_is_revoked(site):
    grant = site.post("/api/grants", {"grantee": "10001"}, patient(site)).json()
    cookie = link_cookie(site, "alice-1", doctor(site))
    assert len(site.client.get("/dicom-web/studies", headers={"Cookie": cookie}).json()) == 1
    site.delete(f"/api/grants/{grant['id']}", patient(site))
    assert site.client.get("/dicom-web/studies", headers={"Cookie": cookie}).json() == []


def test_a_link_made_under_a_grant_does_not_open_once_the_grant_is_revoked(site):
    grant = site.post("/api/grants", {"grantee": "10001"}, patient(site)).json()
    made = site.post("/api/links", {"StudyInstanceUID": site.studies["alice-1"]}, doctor(site)).json()
    site.delete(f"/api/grants/{grant['id']}", patient(site))
    assert site.client.get(urlsplit(made["url"]).path).status_code == 404


def test_the_patient_sees_and_revokes_a_link_a_professional_made_to_their_study(site):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    cookie = link_cookie(site, "alice-1", doctor(site))
    listed = site.get("/api/links", patient(site)).json()
    assert len(listed) == 1 and listed[0]["StudyInstanceUID"] == site.studies["alice-1"]
    assert site.delete(f"/api/links/{listed[0]['id']}", patient(site)).status_code == 204
    route = of_kind("study")[0]
    assert call(site, route, targets(site)["alice-1"], cookie=cookie).status_code == 401
    # Another patient neither sees nor revokes it.
    assert site.get("/api/links", patient(site, BOB)).json() == []


# -- exactly one audit record per request -----------------------------------------------------------


def callers(site: Site) -> dict[str, dict[str, str | None]]:
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    return {
        "anonymous": {},
        "forged token": {"token": "eyJhbGciOiJub25lIn0.eyJpc3MiOiJodHRwczovL3BzYy50ZXN0L2F1dGgifQ."},
        "expired token": {"token": site.token(PSC, lifetime=-600, sub="10001")},
        "patient": {"token": patient(site)},
        "professional": {"token": doctor(site)},
        "link": {"cookie": link_cookie(site, "alice-1", patient(site))},
        "stale session": {"cookie": "gateway_session=not-a-session"},
    }


@pytest.mark.parametrize("route", TABLE, ids=route_id)
def test_every_request_leaves_exactly_one_record_refusals_included(site, route):
    target = targets(site)["alice-1"]
    for name, credentials in callers(site).items():
        before = site.access.store.audit_count() + site.access.audit.flush()
        response = call(site, route, target, credentials.get("token"), credentials.get("cookie"))
        site.access.audit.flush()
        written = site.access.store.audit_count() - before
        if route.kind == "public":
            assert written == 0, name
            continue
        assert written == 1, f"{name}: {written} records for one request"
        record = site.access.store.audit(limit=1)[0]
        assert record.status == response.status_code, name
        assert record.request_id == response.headers["x-request-id"]
        if name in ("anonymous", "forged token", "expired token", "stale session"):
            # Unauthenticated requests never enter a patient's history.
            assert record.patients == () and record.patient is None, name


def test_an_anonymous_iid_request_for_a_patient_does_not_enter_their_history(site):
    for _ in range(20):
        response = site.get(f"/IHEInvokeImageDisplay?requestType=PATIENT&patientID={ALICE}")
        assert response.status_code == 401
    history = site.get("/api/audit", patient(site)).json()
    assert all(record["role"] != "anonymous" for record in history)


# -- bounded bodies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", [r for r in TABLE if r.method == "POST"], ids=route_id)
def test_a_body_past_the_bound_is_refused_without_being_held(site, route):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    body = b'{"x": "' + b"a" * 2_000_000 + b'"}'
    samu = site.token(PSC, sub="20002", roles=["samu"])
    refused = []
    for token in (patient(site), doctor(site), samu):
        response = site.client.request(
            "POST",
            targets(site)["alice-1"].url(route),
            content=body,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code in (400, 403), response.text  # 403: the caller may not post here
        if response.status_code == 400:
            assert "larger than 65536 bytes" in response.text
            refused.append(token)
    assert refused, "no caller got as far as the body"
