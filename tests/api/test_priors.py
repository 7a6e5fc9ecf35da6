"""GET /api/priors through the app: the patient's other studies across sources, ranked with their
reasons, filtered by the access policy, audited; on both registry backends."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from tests.access import conftest as access
from tests.access.conftest import ALICE, BOB, Site
from tests.api import test_fhir
from tests.api.test_fhir import CR, MR, doctor, patient

site, world = access.site, test_fhir.world  # the fixtures: the access suite's site, with Alice's PACS


def priors(at: Site, study: str, token: str | None, **params: str):
    return at.get("/api/priors", token, params={"StudyInstanceUID": study, **params})


def granted(at: Site) -> str:
    assert at.post("/api/grants", {"grantee": "10001"}, patient(at)).status_code == 201
    return doctor(at)


def test_a_studys_priors_are_ranked_with_their_reasons(world):
    response = priors(world, world.studies["alice-1"], granted(world))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["patient"] == ALICE and body["ModalitiesInStudy"] == ["CT"]
    assert body["regions"]["CHEST"] == "BodyPartExamined CHEST"
    ranked = [(p["StudyInstanceUID"], p["score"]) for p in body["priors"]]
    assert ranked == [(world.studies["alice-2"], 10), (CR, 4), (MR, 2)]
    best, chest, brain = body["priors"]
    assert [r["rule"] for r in best["reasons"]] == ["modality", "region", "recent", "last"]
    assert "THORAX" in chest["reasons"][0]["detail"] and chest["regions"] == ["CHEST"]
    assert chest["sources"] == ["pacs"] and best["sources"] == ["archive"]
    assert brain["BodyPartExamined"] == ["BRAIN"]
    assert [r["rule"] for r in brain["reasons"]] == ["older", "last"]


def test_priors_leave_out_what_the_caller_may_not_see(world):
    hidden = world.post("/api/hidden", {"StudyInstanceUID": world.studies["alice-2"]}, patient(world))
    assert hidden.status_code == 201
    current = world.studies["alice-1"]
    shown = [p["StudyInstanceUID"] for p in priors(world, current, granted(world)).json()["priors"]]
    assert shown == [CR, MR]  # the hidden study is not among them, nor Bob's
    own = [p["StudyInstanceUID"] for p in priors(world, current, patient(world)).json()["priors"]]
    assert own == [world.studies["alice-2"], CR, MR]  # its patient still sees it


def test_a_study_one_may_not_see_gets_the_one_refusal(world):
    token = doctor(world)  # no grant
    refused = priors(world, world.studies["alice-1"], token)
    missing = priors(world, "1.2.826.0.1.999", token)
    assert refused.status_code == missing.status_code == 403
    uid = world.studies["alice-1"]
    assert refused.text.replace(uid, "<uid>") == missing.text.replace("1.2.826.0.1.999", "<uid>")
    assert priors(world, world.studies["bob"], patient(world)).status_code == 404
    assert priors(world, world.studies["alice-1"], None).status_code == 401


def test_a_link_sees_no_prior_of_its_study(world):
    made = world.post("/api/links", {"StudyInstanceUID": world.studies["alice-1"]}, patient(world))
    opened = world.client.get(urlsplit(made.json()["url"]).path)
    cookie = opened.headers["set-cookie"].split(";")[0]
    params = {"StudyInstanceUID": world.studies["alice-1"]}
    response = world.get("/api/priors", headers={"Cookie": cookie}, params=params)
    assert response.status_code == 200 and response.json()["priors"] == []


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"limit": "51"}, "limit: an integer from 1 to 50"),
        ({"limit": "0"}, "limit"),
        ({"last": "3"}, "unknown parameter(s) 'last'"),
    ],
)
def test_parameters_are_bounded_and_unknown_ones_refused(world, params, named):
    response = priors(world, world.studies["alice-1"], patient(world), **params)
    assert response.status_code == 400 and named in response.text
    assert "required" in world.get("/api/priors", patient(world)).text


def test_the_limit_keeps_the_best(world):
    body = priors(world, world.studies["alice-1"], patient(world), limit="1").json()
    assert [p["StudyInstanceUID"] for p in body["priors"]] == [world.studies["alice-2"]]


def test_the_audit_record_names_the_study_and_its_patient(world):
    priors(world, world.studies["alice-1"], granted(world))
    record = world.records()[-1]
    expected = ("priors.list", world.studies["alice-1"], (ALICE,))
    assert (record.action, record.study, record.patients) == expected
    assert not record.emergency and record.status == 200
    assert BOB not in record.patients


def test_invoke_image_display_opens_the_study_with_its_best_relevant_priors(world):
    current = world.studies["alice-1"]
    token = granted(world)
    url = f"/IHEInvokeImageDisplay?requestType=STUDY&studyUID={current}"
    opened = world.get(url + "&priors=3", token)
    assert opened.status_code == 303, opened.text
    # The brain MR shares neither modality nor region: not opened beside a chest CT.
    shown = parse_qs(urlsplit(opened.headers["location"]).query)["StudyInstanceUIDs"]
    assert shown == [f"{current},{world.studies['alice-2']},{CR}"]
    record = world.records()[-1]
    assert record.action == "viewer.open" and record.patients == (ALICE,)
    assert world.get(url + "&priors=0", token).headers["location"].endswith(f"StudyInstanceUIDs={current}")
    # By default a single study opens with its two best priors.
    shown = parse_qs(urlsplit(world.get(url, token).headers["location"]).query)["StudyInstanceUIDs"]
    assert shown == [f"{current},{world.studies['alice-2']},{CR}"]
    assert world.get(url + "&priors=6", token).status_code == 400
