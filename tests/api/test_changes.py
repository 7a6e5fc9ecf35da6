"""GET /api/changes through the app: what each kind of caller sees of the feed, the bounds of the
query, paging with ``next`` and the Link header, and the audit record; on both registry backends."""

# ruff: noqa: F811
from __future__ import annotations

import secrets
import time
from dataclasses import replace
from urllib.parse import urlsplit

import anyio
import pytest

from fixtures.generate import make_ct_study
from gateway.app import create_app
from gateway.service import Gateway

# The access suite's gateway (issuers, patients and their studies), as the security suite uses it;
# its fixture ``site`` is imported here, so the tests' parameters name it again.
from tests.access.conftest import ALICE, BOB, PORTAL, PSC, Site, site  # noqa: F401
from tests.conftest import make_config


def patient(site: Site, ins: str = ALICE) -> str:
    return site.token(PORTAL, sub=f"patient-{ins}", ins=ins)


def doctor(site: Site, rpps: str = "10001", roles: list[str] | None = None) -> str:
    return site.token(PSC, sub=rpps, organization="750000001", roles=roles or ["radiologist"])


def studies_seen(site: Site, token: str | None, **headers: str) -> set[str]:
    response = site.get("/api/changes?limit=1000", token, headers=headers)
    assert response.status_code == 200, response.text
    names = {uid: name for name, uid in site.studies.items()}
    return {names[change["StudyInstanceUID"]] for change in response.json()["changes"]}


def link_cookie(site: Site, name: str) -> str:
    made = site.post("/api/links", {"StudyInstanceUID": site.studies[name]}, patient(site))
    assert made.status_code == 201, made.text
    opened = site.client.get(urlsplit(made.json()["url"]).path)
    assert opened.status_code == 303, opened.text
    return opened.headers["set-cookie"].split(";")[0]


# -- what each caller sees ------------------------------------------------------------------------


def test_a_patient_sees_the_events_of_their_own_studies(site):
    assert studies_seen(site, patient(site)) == {"alice-1", "alice-2"}
    assert studies_seen(site, patient(site, BOB)) == {"bob"}


def test_a_professional_sees_nothing_until_granted_then_that_patients_events(site):
    assert studies_seen(site, doctor(site)) == set()
    assert site.post("/api/grants", {"grantee": "10001"}, patient(site)).status_code == 201
    assert studies_seen(site, doctor(site)) == {"alice-1", "alice-2"}
    assert studies_seen(site, doctor(site, "10002")) == set()  # another professional


def test_a_hidden_study_leaves_the_feed_of_everyone_but_its_patient(site):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    assert (
        site.post("/api/hidden", {"StudyInstanceUID": site.studies["alice-2"]}, patient(site)).status_code
        == 201
    )
    assert studies_seen(site, doctor(site)) == {"alice-1"}
    assert studies_seen(site, patient(site)) == {"alice-1", "alice-2"}


def test_emergency_access_shows_that_patients_events_flagged_in_the_audit(site):
    samu = doctor(site, "20001", roles=["samu"])
    body = {"patient": BOB, "reason": "unconscious patient, suspected stroke"}
    assert site.post("/api/emergency", body, samu).status_code == 201
    assert studies_seen(site, samu) == {"bob"}
    record = site.records()[-1]
    assert (record.action, record.patients, record.emergency) == ("changes.read", (BOB,), True)


def test_a_link_session_sees_its_study_only(site):
    cookie = link_cookie(site, "alice-1")
    assert studies_seen(site, None, Cookie=cookie) == {"alice-1"}


def test_an_anonymous_caller_gets_401(site):
    response = site.get("/api/changes")
    assert response.status_code == 401


def test_the_audit_record_names_every_patient_the_answer_carried(site):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    site.post("/api/grants", {"grantee": "10001"}, patient(site, BOB))
    assert studies_seen(site, doctor(site)) == {"alice-1", "alice-2", "bob"}
    record = site.records()[-1]
    assert record.action == "changes.read" and record.status == 200
    assert set(record.patients) == {ALICE, BOB}


# -- bounds ----------------------------------------------------------------------------------------

BAD = [
    ("limit=0", "limit: an integer from 1 to 1000"),
    ("limit=1001", "limit: an integer from 1 to 1000"),
    ("limit=ten", "limit: an integer from 1 to 1000"),
    ("since=-1", "since: an integer from 0 to"),
    ("since=1.5", "since: an integer from 0 to"),
    ("since=99999999999999999999", "since: an integer from 0 to"),
    ("since=%D9%A3", "since: an integer from 0 to"),  # an Arabic-Indic digit: isdigit() but not ASCII
    ("after=3", "'after': unknown parameter"),
]


@pytest.mark.parametrize(("query", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_query_out_of_bounds_gets_400_naming_the_bound(site, query, message):
    response = site.get(f"/api/changes?{query}", patient(site))
    assert response.status_code == 400
    assert message in response.text


# -- paging ----------------------------------------------------------------------------------------


def test_pages_follow_next_and_the_link_header_to_every_event_once(site):
    site.post("/api/grants", {"grantee": "10001"}, patient(site))
    everything = site.get("/api/changes?limit=1000", doctor(site)).json()["changes"]
    assert len(everything) >= 2
    collected, url = [], "/api/changes?limit=1"
    for _ in range(len(everything) + 1):
        response = site.get(url, doctor(site))
        page = response.json()
        link = response.headers["link"]
        assert link.endswith('>; rel="next"') and f"since={page['next']}" in link
        if not page["changes"]:
            break
        assert len(page["changes"]) == 1
        collected += page["changes"]
        url = urlsplit(link[1 : link.index(">")])._replace(scheme="", netloc="").geturl()
    assert collected == everything
    assert page["next"] == everything[-1]["seq"]  # an empty page says where to ask again


def test_an_event_carries_its_sequence_time_kind_study_series_count_and_patient(site):
    change = site.get("/api/changes", patient(site)).json()["changes"][0]
    assert change["kind"] == "instances.added" and change["source"] == "archive"
    assert change["patient"] == ALICE and change["instances"] == 2
    assert set(change) == {
        "seq",
        "time",
        "kind",
        "source",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "patient",
        "instances",
    }


# -- retention ---------------------------------------------------------------------------------------


def test_a_since_below_the_retention_horizon_gets_410_naming_it_and_the_way_on(site):
    everything = site.get("/api/changes?since=0", patient(site)).json()["changes"]
    assert everything  # a feed never pruned: since=0 is a plain first page
    registry = site.access.policy.registry
    horizon = everything[0]["seq"]
    assert registry.prune_changes(older_than=time.time() + 1, through=horizon) == 1
    for since in (0, horizon - 1):
        response = site.get(f"/api/changes?since={since}", patient(site))
        assert response.status_code == 410
        body = response.json()
        assert body["horizon"] == horizon
        assert f"continue from since={horizon}" in body["error"] and "re-read" in body["error"]
    record = site.records()[-1]
    assert (record.action, record.status) == ("changes.read", 410)
    assert f"events up to {horizon} have been pruned" in (record.reason or "")
    # From the horizon on, nothing is missing.
    rest = site.get(f"/api/changes?since={horizon}", patient(site))
    assert rest.status_code == 200 and rest.json()["changes"] == everything[1:]


# -- the announcer runs with the app ---------------------------------------------------------------


def test_the_app_announces_quiet_studies_while_it_harvests(tmp_path, registry_urls):
    folder = tmp_path / "archive"
    make_ct_study(folder / "study", n_instances=2, rows=8, cols=8, study_uid="1.2.826.0.9.7")
    name = f"feed-{secrets.token_hex(4)}"  # a harvest lock of its own (database-wide on PostgreSQL)
    config = make_config(folder, registry_urls.url(tmp_path / "registry.db"), name=name)
    gateway = Gateway(replace(config, changes_quiet=0.05, data_dir_override=tmp_path))
    app = create_app(gateway, harvest=True)
    seen: list[str] = []

    async def main() -> None:
        async with app.starlette.router.lifespan_context(app.starlette):
            with anyio.fail_after(10):
                while "study.available" not in seen:
                    seen[:] = [change.kind for change in gateway.registry.changes(0, 100)]
                    await anyio.sleep(0.05)

    anyio.run(main)
    assert seen == ["instances.added", "study.available"]


def test_the_app_runs_the_retention_pass_with_the_subscriptions_store(tmp_path, registry_urls):
    folder = tmp_path / "archive"
    make_ct_study(folder / "study", n_instances=1, rows=8, cols=8, study_uid="1.2.826.0.9.8")
    name = f"feed-{secrets.token_hex(4)}"
    config = make_config(folder, registry_urls.url(tmp_path / "registry.db"), name=name)
    gateway = Gateway(replace(config, data_dir_override=tmp_path))
    app = create_app(gateway, harvest=True)
    passes: list[object] = []
    gateway.prune = lambda subscriptions, now=None: passes.append(subscriptions) or (0, 0)  # type: ignore[method-assign]

    async def main() -> None:
        async with app.starlette.router.lifespan_context(app.starlette):
            with anyio.fail_after(10):
                while not passes:
                    await anyio.sleep(0.02)

    anyio.run(main)
    assert passes == [app.starlette.state.notify.store]  # at start, then hourly
