"""QIDO answers equal a plain reference's (``tests/qido_reference.py``) over a registry written by
several sources through the registry's own write API, updates included, on both backends.

A fixed seed and a small registry keep this in CI (a few seconds per backend); ``bench/qido_check.py``
runs the same check at 100,000 instances.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from gateway.app import create_app
from gateway.config import AuthConfig, Config, ServerConfig
from gateway.registry.store import Registry
from gateway.service import Gateway
from tests.backends import Databases
from tests.conftest import Client
from tests.qido_reference import World, build_world, check, counts

SIZE = 2000  # instances
QUERIES = 300
SEED = 20261201


class Checked(NamedTuple):
    world: World
    client: Client
    registry: Registry


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory, registry_urls: Databases) -> Iterator[Checked]:
    path: Path = tmp_path_factory.mktemp("reference") / "registry.db"
    url = registry_urls.url(path)
    registry = Registry(url)
    world = build_world(registry, SIZE, SEED, registry.dialect)
    gateway = Gateway(Config(ServerConfig(), url, (), auth=AuthConfig(open=True)), registry=registry)
    yield Checked(world, Client(create_app(gateway)), registry)
    registry.close()


def test_the_registry_holds_what_the_sources_hold_after_every_kind_of_update(checked):
    world, _, registry = checked
    assert set(world.operations) == {
        "move to another series", "move to a new series", "move between sources", "copy to another source",
        "remove a copy", "remove a series", "reuse a path", "rename a patient",
    }  # fmt: skip
    held = registry.counts()
    assert {k: held[k] for k in ("studies", "series", "instances", "locations")} == counts(world)


def test_random_queries_answer_as_the_reference_matching_does(checked):
    world, client, _ = checked
    report = check(world, client, QUERIES, SEED)
    assert report.statuses.get(200, 0) > 0.9 * QUERIES and report.statuses.get(404, 0) > 0
    assert report.results > 10 * QUERIES  # most queries match something: they prove more
    assert not report.mismatches, f"{len(report.mismatches)} of {QUERIES} differ:\n" + "\n".join(
        report.mismatches[:10]
    )
