"""Remote sources are harvested by date window between full runs; only full runs remove."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.registry import harvest as harvest_module
from gateway.registry.harvest import harvest
from gateway.registry.store import Registry
from gateway.types import Entry, PixelInfo
from tests.backends import Databases


def instance(uid: str) -> Entry:
    body = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00080018": {"vr": "UI", "Value": [uid]},
        "00100020": {"vr": "LO", "Value": ["P1"]},
    }
    pixel = PixelInfo(None, "remote", False, "OW", -1, -1, {"remote": 0, "bulk": {}})
    return Entry(f"/studies/1.2.3/series/1.2.3.4/instances/{uid}", 1, 1, prepared=(body, pixel))


class FakeRemote:
    """A remote source whose holdings the test sets; it records the window it was asked for."""

    kind = "dicomweb"

    def __init__(self) -> None:
        self.name = "remote"
        self.holds: list[str] = []
        self.asked: list[str | None] = []

    def scan(self, since: str | None = None) -> Iterator[Entry]:
        self.asked.append(since)
        return iter([instance(uid) for uid in self.holds])


@pytest.fixture
def registry(tmp_path: Path, registry_urls: Databases) -> Iterator[Registry]:
    registry = Registry(registry_urls.url(tmp_path / "registry.db"))
    yield registry
    registry.close()


def test_the_first_run_is_full_and_the_next_asks_for_recent_studies_only(registry):
    source = FakeRemote()
    source.holds = ["1.1", "1.2"]
    harvest(registry, source)  # type: ignore[arg-type]
    harvest(registry, source)  # type: ignore[arg-type]
    assert source.asked[0] is None
    assert source.asked[1] is not None and len(source.asked[1]) == 8  # YYYYMMDD


def test_an_incremental_run_removes_nothing_and_a_full_run_does(registry, monkeypatch):
    source = FakeRemote()
    source.holds = ["1.1", "1.2"]
    harvest(registry, source)  # type: ignore[arg-type]
    source.holds = ["1.2"]  # 1.1 deleted upstream, or merely outside the window: cannot tell
    stats = harvest(registry, source)  # type: ignore[arg-type]
    assert stats.since is not None and stats.removed == 0
    assert registry.counts()["instances"] == 2
    monkeypatch.setattr(harvest_module, "FULL_EVERY", -1.0)  # a full run is due
    stats = harvest(registry, source)  # type: ignore[arg-type]
    assert stats.since is None and stats.removed == 1
    assert registry.counts()["instances"] == 1
