"""POST/GET/DELETE /api/subscriptions through the application (both backends)."""

from __future__ import annotations

from gateway.config import NotifyConfig
from tests.notify.support import ALICE, BOB, doctor, grant

ALLOWED = ("https://ehr.example:443", "mllp://ris.example:2575")


def allow(site, *origins: str) -> None:
    site.client.app.starlette.state.notify.config = NotifyConfig(allowed_origins=origins)


def body(endpoint: str = "https://ehr.example/fhir/notify", kind: str = "rest-hook", **extra):
    return {"channel": {"type": kind, "endpoint": endpoint, **extra}}


def test_a_professional_subscribes_lists_and_revokes(site):
    allow(site, *ALLOWED)
    grant(site)
    made = site.post(
        "/api/subscriptions",
        body(header="Authorization: Bearer ehr-secret") | {"scope": {"patient": ALICE}},
        doctor(site),
    )
    assert made.status_code == 201, made.text
    answer = made.json()
    assert answer["scope"] == {"patient": ALICE} and answer["payload"] == "id-only"
    assert answer["channel"]["header"] == "Authorization: …"  # the value is never shown
    listed = site.get("/api/subscriptions", doctor(site))
    assert [s["id"] for s in listed.json()] == [answer["id"]]
    assert "ehr-secret" not in listed.text
    # Another professional neither sees nor revokes it.
    assert site.get("/api/subscriptions", doctor(site, "10002")).json() == []
    assert site.delete(f"/api/subscriptions/{answer['id']}", doctor(site, "10002")).status_code == 404
    assert site.delete(f"/api/subscriptions/{answer['id']}", doctor(site)).status_code == 204
    assert site.get("/api/subscriptions", doctor(site)).json() == []
    actions = [r.action for r in site.records()]
    assert {"subscription.create", "subscription.list", "subscription.revoke"} <= set(actions)


def test_an_mllp_subscription_for_every_granting_patient(site):
    allow(site, *ALLOWED)
    made = site.post("/api/subscriptions", body("mllp://ris.example:2575", "mllp"), doctor(site))
    assert made.status_code == 201, made.text
    assert made.json()["scope"] == "all"


def test_an_origin_the_operator_did_not_allow_is_refused_naming_it(site):
    allow(site, *ALLOWED)
    for endpoint, origin in (
        ("https://evil.example/hook", "https://evil.example:443"),
        ("https://ehr.example:8443/hook", "https://ehr.example:8443"),
        ("http://ehr.example/hook", "http://ehr.example:80"),
    ):
        refused = site.post("/api/subscriptions", body(endpoint), doctor(site))
        assert refused.status_code == 400 and origin in refused.text, refused.text
    mllp = site.post("/api/subscriptions", body("mllp://ris.example:2576", "mllp"), doctor(site))
    assert mllp.status_code == 400 and "mllp://ris.example:2576" in mllp.text


def test_malformed_subscriptions_are_refused(site):
    allow(site, *ALLOWED)
    for wrong in (
        {},
        body("https://user:pw@ehr.example/hook"),
        body("ftp://ehr.example/hook"),
        body("https://ehr.example/hook", "mllp"),
        body("mllp://ris.example:2575/path", "mllp"),
        body(header="Host: other.example"),
        body(header="X-Key: a\r\nInjected: yes"),
        body() | {"payload": "everything"},
        body() | {"scope": {"patient": "../1"}},
    ):
        assert site.post("/api/subscriptions", wrong, doctor(site)).status_code == 400, wrong


def test_a_patient_cannot_subscribe(site):
    allow(site, *ALLOWED)
    patient = site.token("https://portal.test/auth", sub=f"patient-{ALICE}", ins=ALICE)
    assert site.post("/api/subscriptions", body(), patient).status_code == 403
    assert site.get("/api/subscriptions", patient).status_code == 403
    assert site.post("/api/subscriptions", body()).status_code == 401


def test_one_patient_needs_that_patients_grant(site):
    allow(site, *ALLOWED)
    refused = site.post("/api/subscriptions", body() | {"scope": {"patient": BOB}}, doctor(site))
    assert refused.status_code == 403
