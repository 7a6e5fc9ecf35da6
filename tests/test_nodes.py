"""Several gateway nodes on one PostgreSQL database behave as one: a grant, a hidden study or a
revoked link made on one node is enforced on the other within a second, and a source is
harvested by one node at a time. Two real ``gateway serve`` processes, real PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.registry.database import PostgresDatabase, SQLiteDatabase
from peers.gateway import folder_source, running_gateway
from tests.backends import Databases, databases, postgres_problem, postgres_required
from tests.helpers import PORTAL, PSC, issuers, study_with_ins

pytestmark = pytest.mark.network
INS = "1800175123456"
FRESH = 1.5  # seconds: decisions may be reused for 1 s on a node; allow for the request itself


@pytest.fixture(scope="module")
def postgres() -> Iterator[Databases]:
    problem = postgres_problem()
    if problem and postgres_required():
        pytest.fail(f"GATEWAY_TEST_POSTGRESQL is set but {problem}")
    if problem:
        pytest.skip(problem)
    yield from databases("postgresql")


@pytest.fixture(scope="module")
def nodes(postgres: Databases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("nodes")
    folder = work / "archive"
    study = study_with_ins(folder, INS, seed=3)
    found = issuers(work)
    auth, token = found.auth, found.token

    patient = {"Authorization": f"Bearer {token(PORTAL, sub='p', ins=INS)}"}
    doctor = {"Authorization": f"Bearer {token(PSC, sub='10001')}"}
    url = postgres.url(work / "unused.db")
    source = folder_source("archive", folder)
    with (
        running_gateway(source, work / "a", auth=auth, headers=patient, registry_url=url) as a,
        running_gateway(source, work / "b", auth=auth, headers=patient, registry_url=url) as b,
    ):
        yield {
            "a": a.removesuffix("/dicom-web"),
            "b": b.removesuffix("/dicom-web"),
            "study": study,
            "patient": patient,
            "doctor": doctor,
            "logs": [work / "a" / "gateway.log", work / "b" / "gateway.log"],
        }


def eventually(check: Callable[[], bool], within: float = FRESH) -> float:
    """Seconds until ``check()`` held; fails after ``within``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s")
        time.sleep(0.05)
    return time.monotonic() - started


def metadata_status(origin: str, study: str, headers: dict[str, str]) -> int:
    return httpx.get(f"{origin}/dicom-web/studies/{study}/metadata", headers=headers, timeout=10).status_code


def test_a_grant_on_one_node_opens_the_study_on_the_other(nodes):
    a, b, study = nodes["a"], nodes["b"], nodes["study"]
    assert metadata_status(b, study, nodes["doctor"]) == 403
    grant = httpx.post(f"{a}/api/grants", json={"grantee": "10001"}, headers=nodes["patient"], timeout=10)
    assert grant.status_code == 201, grant.text
    eventually(lambda: metadata_status(b, study, nodes["doctor"]) == 200)
    revoked = httpx.delete(f"{a}/api/grants/{grant.json()['id']}", headers=nodes["patient"], timeout=10)
    assert revoked.status_code == 204
    eventually(lambda: metadata_status(b, study, nodes["doctor"]) == 403)


def test_a_study_hidden_on_one_node_is_hidden_on_the_other(nodes):
    a, b, study = nodes["a"], nodes["b"], nodes["study"]
    grant = httpx.post(f"{a}/api/grants", json={"grantee": "10001"}, headers=nodes["patient"], timeout=10)
    eventually(lambda: metadata_status(a, study, nodes["doctor"]) == 200)
    hidden = httpx.post(
        f"{b}/api/hidden", json={"StudyInstanceUID": study}, headers=nodes["patient"], timeout=10
    )
    assert hidden.status_code == 201, hidden.text
    eventually(lambda: metadata_status(a, study, nodes["doctor"]) == 403)  # as if it were not there
    httpx.delete(f"{b}/api/hidden/{study}", headers=nodes["patient"], timeout=10)
    httpx.delete(f"{a}/api/grants/{grant.json()['id']}", headers=nodes["patient"], timeout=10)


def test_a_link_made_on_one_node_works_on_the_other_until_revoked(nodes):
    a, b, study = nodes["a"], nodes["b"], nodes["study"]
    body = {"StudyInstanceUID": study, "expires_in": 600}
    link = httpx.post(f"{a}/api/links", json=body, headers=nodes["patient"], timeout=10).json()
    secret_path = link["url"].split("/link/", 1)[1]
    opened = httpx.get(f"{b}/link/{secret_path}", timeout=10)  # the portal's user lands on node b
    assert opened.status_code == 303
    cookie = {"Cookie": opened.headers["set-cookie"].split(";")[0]}
    assert metadata_status(a, study, cookie) == 200  # and the load balancer sends the viewer to a
    assert (
        httpx.delete(f"{b}/api/links/{link['id']}", headers=nodes["patient"], timeout=10).status_code == 204
    )
    eventually(lambda: metadata_status(a, study, cookie) == 401)


def test_both_nodes_serve_the_same_index(nodes):
    found = []
    for origin in (nodes["a"], nodes["b"]):
        studies = httpx.get(f"{origin}/dicom-web/studies", headers=nodes["patient"], timeout=10).json()
        for item in studies:
            assert item.pop("00081190")["Value"][0].startswith(origin)  # RetrieveURL: this node
        found.append(studies)
    assert found[0] == found[1] and len(found[0]) == 1


def test_one_holder_at_a_time_for_a_harvest_lock(postgres, tmp_path):
    url = postgres.url(tmp_path / "unused.db")
    first, second = PostgresDatabase(url), PostgresDatabase(url)
    try:
        with first.exclusive("harvest:x") as mine:
            assert mine
            with second.exclusive("harvest:x") as theirs:
                assert not theirs
        with second.exclusive("harvest:x") as theirs:
            assert theirs  # released with the first holder
    finally:
        first.close()
        second.close()


def test_one_holder_at_a_time_for_a_harvest_lock_on_sqlite(tmp_path: Path):
    first, second = SQLiteDatabase(tmp_path / "r.db"), SQLiteDatabase(tmp_path / "r.db")
    with first.exclusive("harvest:x") as mine:
        assert mine
        with second.exclusive("harvest:x") as theirs:
            assert not theirs
    with second.exclusive("harvest:x") as theirs:
        assert theirs
