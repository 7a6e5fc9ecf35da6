"""System clients: an EHR or a RIS with its own credentials (a client-credentials token of a
``system`` issuer), acting for its organization. It sees what patients granted its organization,
nothing by emergency rules, makes no links and manages no grants; consent is checked at use."""

from __future__ import annotations

import pytest

from gateway.access.identity import Principal
from gateway.config import NotifyConfig
from tests.access.conftest import ALICE, BOB, CLIENTS, PORTAL, PSC, Site

ORG = "750000001"


def ris(site: Site, client: str = "ris-1", org: str | None = ORG) -> str:
    claims = {"organization": org} if org is not None else {}
    return site.token(CLIENTS, sub=client, **claims)


def patient(site: Site, ins: str = ALICE) -> str:
    return site.token(PORTAL, sub=f"patient-{ins}", ins=ins)


def grant(site: Site, grantee: str, ins: str = ALICE) -> str:
    made = site.post("/api/grants", {"grantee": grantee}, patient(site, ins))
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def studies(site: Site, token: str) -> set[str]:
    found = site.get("/dicom-web/studies", token)
    assert found.status_code == 200, found.text
    return {item["0020000D"]["Value"][0] for item in found.json()}


def test_a_system_client_sees_what_patients_granted_its_organization_until_revoked(site):
    alice = {site.studies["alice-1"], site.studies["alice-2"]}
    assert studies(site, ris(site)) == set()
    metadata = f"/dicom-web/studies/{site.studies['alice-1']}/metadata"
    assert site.get(metadata, ris(site)).status_code == 403
    granted = grant(site, f"org:{ORG}")  # named within PSC: the organizations_of of CLIENTS
    assert studies(site, ris(site)) == alice
    assert site.get(metadata, ris(site)).status_code == 200
    fhir = site.get(f"/fhir/ImagingStudy?patient.identifier={ALICE}", ris(site))
    assert fhir.status_code == 200 and fhir.json()["total"] == 2, fhir.text
    assert site.get(f"/dicom-web/studies/{site.studies['bob']}/metadata", ris(site)).status_code == 403
    assert studies(site, ris(site, org="750000002")) == set()  # another organization's client
    assert site.delete(f"/api/grants/{granted}", patient(site)).status_code == 204
    assert studies(site, ris(site)) == set()
    assert site.get(metadata, ris(site)).status_code == 403
    reads = [r for r in site.records() if r.action == "metadata" and r.actor == "ris-1"]
    assert [(r.role, r.issuer, r.organization, r.outcome) for r in reads] == [
        ("system", CLIENTS, ORG, "denied"),
        ("system", CLIENTS, ORG, "success"),
        ("system", CLIENTS, ORG, "denied"),  # BOB's study
        ("system", CLIENTS, ORG, "denied"),
    ], "every access of the client is audited under its own name and organization"


def test_a_grant_to_one_professional_does_not_reach_their_organizations_software(site):
    grant(site, "10001")
    assert studies(site, site.token(PSC, sub="10001", organization=ORG)) != set()
    assert studies(site, ris(site)) == set()
    assert studies(site, ris(site, client="10001")) == set()  # a client named like the RPPS is not them


def test_a_system_token_without_an_organization_is_refused_naming_the_claim(site):
    refused = site.get("/dicom-web/studies", ris(site, org=None))
    assert refused.status_code == 401 and "organization" in refused.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/links", {"StudyInstanceUID": "1.2.826.0.1.1"}),
        ("POST", "/api/emergency", {"patient": ALICE, "reason": "unconscious"}),
        ("POST", "/api/grants", {"grantee": "10009"}),
        ("GET", "/api/grants", None),
        ("POST", "/api/hidden", {"StudyInstanceUID": "1.2.826.0.1.1"}),
    ],
)
def test_a_system_client_makes_no_links_no_emergency_access_and_no_grants(site, method, path, body):
    grant(site, f"org:{ORG}")
    if body is None:
        answer = site.get(path, ris(site))
    else:
        answer = site.post(path, body, ris(site))
    assert answer.status_code == 403, answer.text


def test_an_organization_is_named_within_the_issuer_its_clients_defer_to(site):
    refused = site.post("/api/grants", {"grantee": f"org:{ORG}", "issuer": CLIENTS}, patient(site))
    assert refused.status_code == 400 and "issuer" in refused.text
    own = Principal(role="system", actor="ris-1", issuer="https://own.test", organization="42")
    assert own.grantee_keys == ("org:https://own.test|42",)
    deferring = Principal(role="system", actor="ris-1", issuer=CLIENTS, organization="42", namespace=PSC)
    assert deferring.grantee_keys == (f"org:{PSC}|42",)


def test_a_system_client_subscribes_and_is_told_of_granted_patients_only(site):
    """Through the application's own dispatcher (the issuer's organizations_of wired in)."""
    dispatcher = site.client.app.starlette.state.notify
    dispatcher.config = NotifyConfig(allowed_origins=("mllp://ris.example:2575",))
    granted = grant(site, f"org:{ORG}")
    made = site.post(
        "/api/subscriptions", {"channel": {"type": "mllp", "endpoint": "mllp://ris.example:2575"}}, ris(site)
    )
    assert made.status_code == 201, made.text
    subscription = dispatcher.store.get(made.json()["id"])
    assert (subscription.role, subscription.subject, subscription.issuer) == ("system", "ris-1", CLIENTS)
    assert [s["id"] for s in site.get("/api/subscriptions", ris(site)).json()] == [subscription.id]
    assert site.get("/api/subscriptions", ris(site, client="ehr-2")).json() == []  # its own only
    registry = site.access.policy.registry
    registry.announce(0, 1e12)  # the fixture's studies become study.available events
    dispatcher.fan_out()
    rows = dispatcher.store.outbox(subscription.id)
    assert sorted(row["StudyInstanceUID"] for row in rows) == sorted(
        [site.studies["alice-1"], site.studies["alice-2"]]
    ), "ALICE granted the organization; BOB and the study without INS did not"
    assert all(row["patient"] == ALICE for row in rows)
    assert BOB not in {row["patient"] for row in rows}
    # Consent is checked again before each attempt: a revoked grant withholds what is owed.
    assert site.delete(f"/api/grants/{granted}", patient(site)).status_code == 204
    pending = dispatcher.store.oldest_pending([subscription.id], 10)[subscription.id]
    assert pending and not any(dispatcher.may_see(subscription, row) for row in pending)
