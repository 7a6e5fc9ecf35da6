"""The real OHIF viewer in headless Chromium showing a study served by a real gateway: opened
directly (open access), and through a study link (access control on), which stops working the
moment it is revoked."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import httpx
import jwt
import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.access.control import SESSION_COOKIE
from peers.gateway import folder_source, running_gateway
from tests.viewer.conftest import open_viewer_and_check
from tests.viewer.test_viewer import PAGE, get

INS = "1800175123456"  # the patient's national identifier


@pytest.mark.network
def test_the_installed_viewer_loads_nothing_from_the_root(installed_viewer):
    """Every absolute path in the real index.html is rewritten under /viewer/ (a new OHIF
    release that adds another kind of reference fails here first)."""
    html = get(installed_viewer, "/viewer/", headers=PAGE).text
    assert "window.PUBLIC_URL = '/viewer/'" in html
    assert not re.search(r"""(src|href|content)=["']/(?!viewer/|/)""", html)
    bundle = re.search(r'src="/viewer/(app\.bundle\.[0-9a-f]+\.js)"', html)
    assert bundle, html
    assert '__webpack_require__.p = "/viewer/";' in get(installed_viewer, f"/viewer/{bundle[1]}").text


@pytest.mark.network
def test_viewer_shows_a_study_from_the_gateway(browser, viewer_gateway, ct_study):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        seen = open_viewer_and_check(page, f"{viewer_gateway}/viewer/viewer?StudyInstanceUIDs={ct_study[1]}")
    finally:
        page.close()
    assert [s for s, _ in seen["metadata"]] and all(s == 200 for s, _ in seen["metadata"]), seen
    assert any(s == 200 for s, _ in seen["frames"]), seen
    assert seen["canvas_nonblank"], seen
    assert seen["failed"] == [], seen
    assert seen["csp_violations"] == [], seen
    assert seen["page_errors"] == [], seen


@pytest.fixture(scope="module")
def linked_site(ct_study, installed_viewer, tmp_path_factory) -> Iterator[tuple[str, str, str]]:
    """A gateway with access control on (a portal issuer for patients, keys in a file) serving
    the CT study as the patient's (their INS added to it); yields the origin, a patient token and
    the study UID."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    work = tmp_path_factory.mktemp("link-gateway")
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (work / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "portal", "alg": "RS256"}]}))
    folder = work / "study"
    for path in sorted(ct_study[0].rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        item = Dataset()
        item.PatientID, item.IssuerOfPatientID = INS, "1.2.250.1.213.1.4.8"
        ds.OtherPatientIDsSequence = Sequence([item])
        folder.mkdir(exist_ok=True)
        ds.save_as(folder / path.name)
    now = time.time()
    claims = {"iss": "https://portal.test", "aud": "gateway", "sub": "p1", "ins": INS, "exp": now + 900}
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "portal"})
    auth = (
        '[auth]\n[[auth.issuers]]\nissuer = "https://portal.test"\naudience = "gateway"\n'
        f'jwks_file = "{work / "jwks.json"}"\nrole = "patient"\n'
    )
    (work / "viewer").symlink_to(installed_viewer, target_is_directory=True)
    bearer = {"Authorization": f"Bearer {token}"}
    with running_gateway(folder_source("ct", folder), work, auth=auth, headers=bearer) as url:
        yield url.removesuffix("/dicom-web"), token, ct_study[1]


@pytest.mark.network
def test_a_study_link_opens_the_viewer_and_stops_working_when_revoked(browser, linked_site):
    origin, token, study = linked_site
    bearer = {"Authorization": f"Bearer {token}"}
    created = httpx.post(
        f"{origin}/api/links", json={"StudyInstanceUID": study, "expires_in": 600}, headers=bearer
    )
    assert created.status_code == 201, created.text
    link = created.json()
    context = browser.new_context(viewport={"width": 1280, "height": 800})  # its own cookie jar
    page = context.new_page()
    try:
        seen = open_viewer_and_check(page, link["url"])
        assert "/link/" not in seen["final_url"]  # the secret does not stay in the address bar
        assert [s for s, _ in seen["metadata"]] and all(s == 200 for s, _ in seen["metadata"]), seen
        assert any(s == 200 for s, _ in seen["frames"]), seen
        assert seen["canvas_nonblank"], seen
        sessions = [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
        assert [(c["httpOnly"], c["sameSite"]) for c in sessions] == [(True, "Strict")]
        metadata = f"/dicom-web/studies/{study}/metadata"
        fetch = f"fetch('{metadata}').then(r => r.status)"
        assert page.evaluate(fetch) == 200
        revoked = httpx.delete(f"{origin}/api/links/{link['id']}", headers=bearer)
        assert revoked.status_code == 204
        assert page.evaluate(fetch) == 401  # the session ends with its link, at once
        again = context.new_page()
        assert again.goto(link["url"]).status == 404
    finally:
        context.close()


@pytest.fixture(scope="module")
def study_with_prior(ct_study, installed_viewer, tmp_path_factory) -> Iterator[tuple[str, str, str]]:
    """A gateway (open access) on the CT study and an earlier CT of the same patient; yields the
    origin, the current study's UID and the prior's."""
    from fixtures.generate import make_ct_study

    work = tmp_path_factory.mktemp("priors-gateway")
    folder = work / "studies"
    current = pydicom.dcmread(sorted(ct_study[0].rglob("*.dcm"))[0])
    for path in make_ct_study(folder / "prior", n_instances=3, rows=64, cols=64, seed=8):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.StudyDate = current.PatientID, "20230101"  # the same patient, a year before
        ds.save_as(path)
    for path in sorted(ct_study[0].rglob("*.dcm")):
        (folder / "current").mkdir(parents=True, exist_ok=True)
        pydicom.dcmread(path).save_as(folder / "current" / path.name)
    prior = str(pydicom.dcmread(sorted((folder / "prior").rglob("*.dcm"))[0]).StudyInstanceUID)
    (work / "viewer").symlink_to(installed_viewer, target_is_directory=True)
    with running_gateway(folder_source("ct", folder), work) as url:
        yield url.removesuffix("/dicom-web"), ct_study[1], prior


@pytest.mark.network
def test_image_display_opens_the_viewer_on_a_study_with_its_prior(browser, study_with_prior):
    origin, current, prior = study_with_prior
    invoked = httpx.get(
        f"{origin}/IHEInvokeImageDisplay?requestType=STUDY&studyUID={current}&priors=2", timeout=10
    )
    assert invoked.status_code == 303, invoked.text
    assert invoked.headers["location"].endswith(f"StudyInstanceUIDs={current}%2C{prior}")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    try:
        seen = open_viewer_and_check(page, origin + invoked.headers["location"])
        deadline = time.monotonic() + 20  # the prior is listed beside the current study
        while not any(prior in url for url in asked if "/dicom-web/" in url) and time.monotonic() < deadline:
            page.wait_for_timeout(200)
    finally:
        page.close()
    assert seen["canvas_nonblank"], seen
    assert seen["failed"] == [] and seen["page_errors"] == [], seen
    assert any(current in url for url in asked if "/dicom-web/" in url)
    assert any(prior in url for url in asked if "/dicom-web/" in url), [u for u in asked if "dicom-web" in u]
