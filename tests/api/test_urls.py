"""The one URL table (gateway/urls.py) agrees with the routes built from it and with the audit
actions the access middleware derives from it."""

from __future__ import annotations

import pytest
from starlette.routing import Route

from gateway import urls
from gateway.api import audit, emergency, grants, hidden, iid, links
from gateway.api.middleware import action_of
from gateway.dicomweb import endpoints

API_ROUTES = [*links.ROUTES, *grants.ROUTES, *hidden.ROUTES, *emergency.ROUTES, *audit.ROUTES, *iid.ROUTES]
UIDS = {"study": "1.2.3", "series": "1.2.3.4", "instance": "1.2.3.4.5"}
FILLS = {**UIDS, "frames": "1,2", "tag_path": "7FE00010", "id": "x", "secret": "s", "uid": "1.2"}


def filled(template: str) -> str:
    return template.replace("{tag_path:path}", "{tag_path}").format(**FILLS)


def methods(route: Route) -> list[str]:
    return sorted(m for m in route.methods or () if m != "HEAD")


def test_a_placeholder_is_one_path_segment_and_a_path_placeholder_the_rest():
    assert urls.pattern(urls.LINK).match("/api/links/abc")
    assert not urls.pattern(urls.LINK).match("/api/links/a/b")
    bulk = urls.pattern(urls.DICOMWEB + urls.BULK).match(urls.DICOMWEB + filled(urls.BULK) + "/0/00100010")
    assert bulk is not None and bulk.group(4) == "7FE00010/0/00100010"


def test_the_frames_fast_path_matches_the_frames_route_and_nothing_else():
    frames = urls.FRAMES_PATH.match(urls.DICOMWEB + filled(urls.FRAMES))
    assert frames is not None and frames.groups() == ("1.2.3", "1.2.3.4", "1.2.3.4.5", "1,2")
    for route in endpoints.ROUTES:
        if route.path != urls.FRAMES:
            assert not urls.FRAMES_PATH.match(urls.DICOMWEB + filled(route.path)), route.path


@pytest.mark.parametrize("route", endpoints.ROUTES, ids=lambda route: route.path)
def test_every_dicomweb_route_is_audited_as_a_query_a_retrieve_or_metadata(route):
    qido = route.endpoint in (endpoints.qido_studies, endpoints.qido_series, endpoints.qido_instances)
    wanted = "query" if qido else "metadata" if route.endpoint is endpoints.wado_metadata else "retrieve"
    assert action_of("GET", urls.DICOMWEB + filled(route.path)) == wanted


@pytest.mark.parametrize("route", API_ROUTES, ids=lambda route: f"{methods(route)} {route.path}")
def test_every_api_route_has_an_audit_action_of_its_own(route):
    for method in methods(route):
        assert action_of(method, filled(route.path)) != "other"


def test_no_two_api_routes_share_an_audit_action():
    actions = [action_of(m, filled(route.path)) for route in API_ROUTES for m in methods(route)]
    assert len(actions) == len(set(actions))


def test_a_study_uid_in_any_dicomweb_path_is_found_for_the_audit_record():
    for route in endpoints.ROUTES:
        if "{study}" in route.path:
            found = urls.STUDY_PATH.match(urls.DICOMWEB + filled(route.path))
            assert found is not None and found.group(1) == UIDS["study"], route.path
