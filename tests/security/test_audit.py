"""The audit trail is the truth: every patient a response carried, fields that no client can
forge or break, a history paged without silent cuts, aborted transfers recorded as such."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote

import anyio
import pytest

from gateway.access.audit_record import AuditRecord
from tests.security.conftest import ALICE, BOB, PSC, Site
from tests.security.routes import Route, Target, of_kind, route_id
from tests.security.test_routes import call, doctor, link_cookie, patient, targets

JUNK = [
    pytest.param("1.2.3\r\nforged: line\x00\x1b[31m", id="control characters"),
    pytest.param("<x>&amp;</AuditMessage>]]>\ufffe", id="markup"),
    pytest.param("9" * 30_000, id="30 kB (60 kB of path in series and instance)"),
]


@pytest.mark.parametrize("junk", JUNK)
@pytest.mark.parametrize("route", of_kind("study"), ids=route_id)
def test_junk_in_a_path_is_recorded_escaped_and_bounded_and_exports_stay_well_formed(site, route, junk):
    cookie = link_cookie(site, "alice-1", patient(site))
    found = targets(site)["alice-1"]
    junk = quote(junk, safe="")  # as sent on the wire: the server decodes it into the path
    for target in (Target(junk, found.series, found.instance), Target(found.study, junk, junk)):
        call(site, route, target, cookie=cookie)
        call(site, route, target, token=patient(site))
    records = site.records()[-4:]
    for record in records:
        for name in ("path", "study", "reason", "actor", "patient"):
            value = getattr(record, name) or ""
            assert len(value) <= 512 and value.isprintable(), (name, value[:80])
    ET.fromstring(site.get("/api/audit?format=dicom", patient(site)).content)  # well-formed


def test_a_record_cannot_be_made_with_raw_input_whoever_makes_it():
    record = AuditRecord(
        time=0, request_id="r", actor="a\nb", role="patient", action="query", outcome="success", status=200,
        study="<\x00>" * 1000, reason="x\r\ny", path="/link/SECRET-VALUE/x",
    )  # fmt: skip
    assert record.actor == "a\\x0ab" and "\n" not in (record.reason or "")
    assert len(record.study or "") <= 64 and "\x00" not in (record.study or "")
    assert "SECRET-VALUE" not in (record.path or "")


def emergency_doctor(site: Site) -> str:
    return site.token(PSC, sub="20002", organization="750000002", roles=["samu"])


def test_a_qido_answer_names_every_patient_it_carried_and_emergency_access(site):
    site.post("/api/grants", {"grantee": "20002"}, patient(site))  # Alice granted; Bob did not
    token = emergency_doctor(site)
    opened = site.post("/api/emergency", {"patient": BOB, "reason": "unconscious, brought by SAMU"}, token)
    assert opened.status_code == 201, opened.text
    studies = site.get("/dicom-web/studies", token).json()
    assert len(studies) == 3  # Alice's two, Bob's one
    record = site.records()[-1]
    assert set(record.patients) == {ALICE, BOB}
    assert record.emergency
    # And each patient finds it in their own history.
    for ins in (ALICE, BOB):
        history = site.get("/api/audit", patient(site, ins)).json()
        assert any(r["request_id"] == record.request_id for r in history), ins


def test_a_granted_qido_is_not_marked_emergency(site):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    site.get("/dicom-web/studies", doctor(site))
    record = site.records()[-1]
    assert record.patients == (ALICE,) and not record.emergency


def test_an_image_display_over_two_patients_names_both(site):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    site.post("/api/grants", {"grantee": "10001"}, patient(site, BOB))
    studies = f"{site.studies['alice-1']},{site.studies['bob']}"
    response = site.get(f"/IHEInvokeImageDisplay?requestType=STUDY&studyUID={studies}", doctor(site))
    assert response.status_code == 303
    assert set(site.records()[-1].patients) == {ALICE, BOB}


def test_the_history_is_paged_with_a_cursor_and_never_cut_silently(site):
    for _ in range(25):
        site.get("/dicom-web/studies", patient(site))
    seen: list[dict[str, Any]] = []
    url = "/api/audit?limit=10"
    pages = 0
    while url:
        response = site.get(url, patient(site))
        assert response.status_code == 200, response.text
        seen += response.json()
        link = response.headers.get("link")
        url = link[link.index("/api/") : link.index(">")] if link else ""
        pages += 1
    ids = [record["id"] for record in seen]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    assert sum(record["action"] == "query" for record in seen) == 25
    assert pages >= 3


def test_the_history_is_filtered_by_time(site):
    site.get("/dicom-web/studies", patient(site))
    assert site.get("/api/audit?since=2999-01-01T00:00:00Z", patient(site)).json() == []
    assert site.get("/api/audit?until=2000-01-01", patient(site)).json() == []
    assert site.get("/api/audit?since=2000-01-01", patient(site)).json()
    assert site.get("/api/audit?since=yesterday", patient(site)).status_code == 400
    assert site.get("/api/audit?limit=0", patient(site)).status_code == 400
    assert site.get("/api/audit?before=" + "9" * 30, patient(site)).status_code == 400


def test_the_fhir_export_links_its_next_page(site):
    for _ in range(3):
        site.get("/dicom-web/studies", patient(site))
    bundle = site.get("/api/audit?format=fhir&limit=2", patient(site)).json()
    assert [link["relation"] for link in bundle["link"]] == ["next"]
    assert len(bundle["entry"]) == 2


def test_an_aborted_transfer_is_recorded_as_incomplete_with_its_end(site):
    """The client hangs up after the first chunk of a study's retrieval."""
    route = Route("GET", "/dicom-web/studies/{study}", "study")
    path = targets(site)["alice-1"].url(route)
    token = patient(site)

    async def hang_up() -> None:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await anyio.sleep(10)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("more_body"):
                raise OSError("connection reset by peer")

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 5000), "server": ("gateway.test", 80),
            "headers": [(b"authorization", f"Bearer {token}".encode()), (b"host", b"gateway.test")],
        }  # fmt: skip
        with pytest.raises(OSError):
            await site.client.app(scope, receive, send)
        assert sent[0]["status"] == 200

    anyio.run(hang_up)
    record = site.records()[-1]
    assert record.outcome == "incomplete" and record.status == 200
    assert record.ended is not None and record.ended >= record.time
    message = ET.fromstring(site.get("/api/audit?format=dicom&limit=2", patient(site)).content)
    outcomes = [e.get("EventOutcomeIndicator") for e in message.iter("EventIdentification")]
    assert "8" in outcomes  # PS3.15 A.5.2: action terminated
