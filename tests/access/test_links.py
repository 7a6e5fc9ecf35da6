"""Study links: created by the patient or an authorized professional, exchanged once per browser
for a study-scoped session cookie, refused the moment they expire or are revoked."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from tests.access.conftest import ALICE, PORTAL, PSC, Site


def patient(site: Site) -> str:
    return site.token(PORTAL, sub="patient-alice", ins=ALICE)


def make_link(site: Site, name: str = "alice-1", expires_in: float = 3600, token: str | None = None):
    body = {"StudyInstanceUID": site.studies[name], "expires_in": expires_in}
    return site.post("/api/links", body, token or patient(site))


def open_link(site: Site, url: str):
    """Follow the link as a browser would, once: returns the response and the session cookie."""
    response = site.client.get(urlsplit(url).path)
    cookie = response.headers.get("set-cookie", "")
    return response, cookie.split(";")[0]


def test_a_patient_creates_a_link_with_an_url_and_an_expiry(site):
    response = make_link(site)
    assert response.status_code == 201, response.text
    link = response.json()
    assert set(link) == {"id", "url", "expires_at"}
    assert urlsplit(link["url"]).path.startswith("/link/")
    assert [item["id"] for item in site.get("/api/links", patient(site)).json()] == [link["id"]]


def test_opening_a_link_sets_a_study_scoped_httponly_cookie_and_opens_the_viewer(site):
    response, cookie = open_link(site, make_link(site).json()["url"])
    assert response.status_code == 303
    assert response.headers["location"] == f"/viewer/viewer?StudyInstanceUIDs={site.studies['alice-1']}"
    attributes = response.headers["set-cookie"].lower()
    assert "httponly" in attributes and "samesite=strict" in attributes
    assert response.headers["cache-control"] == "no-store"
    uids = {
        item["0020000D"]["Value"][0]
        for item in site.client.get("/dicom-web/studies", headers={"Cookie": cookie}).json()
    }
    assert uids == {site.studies["alice-1"]}  # the patient's other study stays out of reach
    other = f"/dicom-web/studies/{site.studies['alice-2']}/metadata"
    assert site.client.get(other, headers={"Cookie": cookie}).status_code == 404
    mine = f"/dicom-web/studies/{site.studies['alice-1']}/metadata"
    assert site.client.get(mine, headers={"Cookie": cookie}).status_code == 200


def test_a_revoked_link_stops_working_at_once(site):
    link = make_link(site).json()
    _, cookie = open_link(site, link["url"])
    url = f"/dicom-web/studies/{site.studies['alice-1']}/metadata"
    assert site.client.get(url, headers={"Cookie": cookie}).status_code == 200
    assert site.delete(f"/api/links/{link['id']}", patient(site)).status_code == 204
    assert site.client.get(url, headers={"Cookie": cookie}).status_code == 401
    assert open_link(site, link["url"])[0].status_code == 404


def test_an_expired_link_is_refused(site):
    link = make_link(site, expires_in=1).json()
    time.sleep(1.1)
    assert open_link(site, link["url"])[0].status_code == 404


def test_a_link_session_cannot_manage_links(site):
    _, cookie = open_link(site, make_link(site).json()["url"])
    body = b'{"StudyInstanceUID": "1.2.826.0.1.1"}'
    response = site.client.request("POST", "/api/links", content=body, headers={"Cookie": cookie})
    assert response.status_code == 403


def test_a_professional_can_link_only_a_study_they_may_see(site):
    doctor = site.token(PSC, sub="10001", organization="750000001")
    assert make_link(site, token=doctor).status_code == 403
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    assert make_link(site, token=doctor).status_code == 201


def test_a_link_to_a_hidden_study_does_not_open(site):
    link = make_link(site).json()
    site.post("/api/hidden", {"StudyInstanceUID": site.studies["alice-1"]}, patient(site))
    assert open_link(site, link["url"])[0].status_code == 404


def test_link_expiry_is_bounded_and_validated(site):
    assert make_link(site, expires_in=-5).status_code == 400
    assert make_link(site, expires_in=10**9).status_code == 400


def test_the_links_secret_is_not_stored_nor_audited(site):
    link = make_link(site).json()
    secret = urlsplit(link["url"]).path.rsplit("/", 1)[1]
    open_link(site, link["url"])
    records = site.records()
    assert [r.action for r in records] == ["link.create", "link.use"]
    assert all(secret not in (r.path or "") for r in records)
    stored = [
        repr(tuple(row))
        for table in ("links", "sessions", "audit")
        for row in site.access.store.db.query(f"SELECT * FROM {table}")
    ]
    assert stored and not any(secret in row for row in stored)


def test_iid_opens_the_viewer_on_a_study_the_caller_may_see(site):
    doctor = site.token(PSC, sub="10001")
    url = f"/IHEInvokeImageDisplay?requestType=STUDY&studyUID={site.studies['alice-1']}&priors=0"
    assert site.get(url, doctor).status_code == 403
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    response = site.get(url, doctor)
    assert response.status_code == 303
    assert response.headers["location"].endswith(f"StudyInstanceUIDs={site.studies['alice-1']}")
    assert site.get("/IHEInvokeImageDisplay?requestType=SERIES", doctor).status_code == 400


def test_a_revoked_links_cookie_does_not_stop_another_link_from_opening(site):
    first = make_link(site).json()
    _, cookie = open_link(site, first["url"])
    site.delete(f"/api/links/{first['id']}", patient(site))
    second = make_link(site, "alice-2").json()
    response = site.client.get(urlsplit(second["url"]).path, headers={"Cookie": cookie})
    assert response.status_code == 303


def test_the_link_list_shows_active_links_unless_all_are_asked_for(site):
    kept, revoked = make_link(site).json(), make_link(site, "alice-2").json()
    site.delete(f"/api/links/{revoked['id']}", patient(site))
    assert [item["id"] for item in site.get("/api/links", patient(site)).json()] == [kept["id"]]
    everything = site.get("/api/links?all=true", patient(site)).json()
    assert [item["id"] for item in everything] == [revoked["id"], kept["id"]]  # newest first
    assert everything[0]["revoked_at"] is not None
