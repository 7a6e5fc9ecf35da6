"""A watched folder is harvested as files land in it, without waiting for the interval: on a real
temporary directory with the kernel's notifications (watchfiles), the real FolderSource and the
service's harvest schedule, on both registry backends. Every wait is bounded (``until``)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pydicom
import pytest

import gateway.registry.store as store
import gateway.service as service
from fixtures.generate import make_ct_study
from gateway.config import SourceConfig, load_config
from gateway.errors import ConfigError, SourceError
from gateway.service import Gateway
from gateway.stream.folder import FolderSource
from gateway.stream.watch import watch_folder
from tests.conftest import make_config

# On PostgreSQL, "one harvest of a source at a time" is an advisory lock named after the source, for
# the whole database: a name of its own keeps other test runs' harvests from looking like another node.
NAME = f"watched-{secrets.token_hex(4)}"
BOUND = 2.0  # seconds from a file's landing to its harvest: the goal (README, "New files...")


@pytest.fixture(autouse=True)
def fresh_locations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "_CACHE_CHECK", 0.0)


class Runs:
    """Every harvest the schedule starts: the paths it was given (None: the whole folder), and
    whether two ever ran at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, before: Callable[[Any], None] | None = None):
        self.paths: list[frozenset[str] | None] = []
        self.running = 0
        self.overlapped = False
        self.before = before
        lock = threading.Lock()
        real = service.harvest

        def spy(registry, source, progress=None, executor=None, paths=None):
            with lock:
                self.running += 1
                self.overlapped |= self.running > 1
            try:
                if self.before is not None:
                    self.before(paths)
                result = real(registry, source, progress, executor, paths=paths)
                self.paths.append(None if paths is None else frozenset(paths))
                return result
            finally:
                with lock:
                    self.running -= 1

        monkeypatch.setattr(service, "harvest", spy)

    @property
    def probes(self) -> list[frozenset[str]]:
        return [p for p in self.paths if p is not None and all(n.startswith(".probe") for n in p)]

    @property
    def partial(self) -> list[frozenset[str]]:
        """Harvests of paths, but those of the readiness probes alone."""
        return [p for p in self.paths if p is not None and p not in self.probes]

    @property
    def full(self) -> int:
        return sum(p is None for p in self.paths)


class Watched:
    """A gateway over one folder whose harvest schedule runs (interval: an hour unless said)."""

    def __init__(self, folder: Path, url: str, interval: float = 3600.0) -> None:
        config = make_config(folder, url, NAME)
        self.source_config = replace(config.sources[0], interval=interval)
        self.gateway = Gateway(replace(config, sources=(self.source_config,)))
        self.folder = folder

    def paths(self) -> set[str]:
        return {r["path"] for r in self.gateway.registry.query("SELECT path FROM locations")}

    def rejects(self) -> dict[str, str]:
        rows = self.gateway.registry.query("SELECT path, reason FROM rejects")
        return {r["path"]: r["reason"] for r in rows}

    def run(self, scenario: Callable[[], Awaitable[None]], runs: Runs, seconds: float = 20.0) -> None:
        """The schedule running, its first full harvest done and the watcher seen working, then
        ``scenario``; all within ``seconds``."""

        async def main() -> None:
            with anyio.fail_after(seconds):
                async with anyio.create_task_group() as group:
                    group.start_soon(self.gateway.harvest_forever, self.source_config)
                    await until(lambda: runs.full >= 1, "the first full harvest")
                    await self.watcher_ready(runs)
                    await scenario()
                    group.cancel_scope.cancel()

        try:
            anyio.run(main)
        finally:
            self.gateway.registry.close()

    async def watcher_ready(self, runs: Runs) -> None:
        """Hidden files (never indexed) touched until a harvest of one shows the watcher is up."""
        for attempt in range(50):
            probe = f".probe-{attempt}"
            (self.folder / probe).write_bytes(b"")
            try:
                await until(lambda name=probe: any(name in p for p in runs.probes), "the probe", 0.3)
            except TimeoutError:
                continue
            return
        raise AssertionError("the watcher never reported a change")


async def until(check: Callable[[], bool], what: str, seconds: float = 5.0) -> float:
    """Seconds until ``check()`` holds; TimeoutError after ``seconds`` (a failure, not a hang)."""
    start = time.monotonic()
    with anyio.fail_after(seconds):
        while not check():
            await anyio.sleep(0.01)
    return time.monotonic() - start


def study(place: Path, n: int = 3, seed: int = 1) -> list[Path]:
    return make_ct_study(place, n_instances=n, rows=8, cols=8, seed=seed)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / NAME
    root.mkdir()
    return root


@pytest.fixture
def url(tmp_path: Path, registry_urls) -> str:
    return registry_urls.url(tmp_path / "registry.db")


def test_a_study_copied_in_is_harvested_within_the_bound_not_the_interval(folder, tmp_path, url, monkeypatch):
    files = study(tmp_path / "staging", n=4)
    watched, runs = Watched(folder, url), Runs(monkeypatch)

    async def scenario() -> None:
        (folder / "s1").mkdir()
        for path in files:
            shutil.copyfile(path, folder / "s1" / path.name)
        wanted = {f"s1/{path.name}" for path in files}
        took = await until(lambda: watched.paths() == wanted, "the study indexed", BOUND)
        assert took < BOUND

    watched.run(scenario, runs)
    assert runs.full == 1  # no full listing after the first one: only what changed was read
    assert runs.partial


def test_a_directory_moved_in_is_harvested_whole(folder, tmp_path, url, monkeypatch):
    study(tmp_path / "staging" / "s2", n=3, seed=2)
    watched, runs = Watched(folder, url), Runs(monkeypatch)

    async def scenario() -> None:
        os.rename(tmp_path / "staging" / "s2", folder / "s2")  # one event: the directory
        await until(lambda: len(watched.paths()) == 3, "the moved study indexed", BOUND)

    watched.run(scenario, runs)
    assert runs.full == 1


def test_a_file_removed_is_dropped_and_a_directory_moved_out_too(folder, tmp_path, url, monkeypatch):
    first = study(folder / "a", n=3, seed=3)
    study(folder / "b", n=2, seed=4)
    watched, runs = Watched(folder, url), Runs(monkeypatch)

    async def scenario() -> None:
        assert len(watched.paths()) == 5
        first[0].unlink()
        await until(lambda: len(watched.paths()) == 4, "the removed file dropped", BOUND)
        os.rename(folder / "b", tmp_path / "b-gone")
        await until(lambda: watched.paths() == {f"a/{p.name}" for p in first[1:]}, "b dropped", BOUND)

    watched.run(scenario, runs)
    assert runs.full == 1


def test_a_burst_of_50_files_is_one_or_two_harvests(folder, tmp_path, url, monkeypatch):
    files = study(tmp_path / "staging", n=50, seed=5)
    watched, runs = Watched(folder, url), Runs(monkeypatch)

    async def scenario() -> None:
        for path in files:
            shutil.copyfile(path, folder / path.name)
        await until(lambda: len(watched.paths()) == 50, "the burst indexed", BOUND)

    watched.run(scenario, runs)
    assert 1 <= len(runs.partial) <= 2, runs.partial


def test_a_change_during_a_harvest_is_not_lost(folder, tmp_path, url, monkeypatch):
    early, late = study(tmp_path / "staging", n=2, seed=6)
    landed = threading.Event()

    def slow_first(paths: Any) -> None:
        # While the first harvest of what the watcher named runs, another file lands.
        if paths is not None and not landed.is_set() and early.name in paths:
            landed.set()
            shutil.copyfile(late, folder / late.name)
            time.sleep(0.5)  # longer than the watcher's debounce: its report comes meanwhile

    watched, runs = Watched(folder, url), Runs(monkeypatch, before=slow_first)

    async def scenario() -> None:
        shutil.copyfile(early, folder / early.name)
        await until(lambda: watched.paths() == {early.name, late.name}, "both indexed", 2 * BOUND)

    watched.run(scenario, runs)
    assert landed.is_set()
    assert not runs.overlapped  # one harvest of a source at a time
    assert any(late.name in paths for paths in runs.partial)


def test_a_watcher_that_fails_logs_once_and_the_interval_scan_goes_on(
    folder, tmp_path, url, monkeypatch, caplog
):
    async def broken(self, changed, stop):
        raise SourceError("inotify watch limit reached")

    monkeypatch.setattr(FolderSource, "watch_changes", broken)
    files = study(tmp_path / "staging", n=2, seed=7)
    watched, runs = Watched(folder, url, interval=0.3), Runs(monkeypatch)

    async def main() -> None:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(watched.gateway.harvest_forever, watched.source_config)
                await until(lambda: runs.full >= 1, "the first full harvest")
                for path in files:
                    shutil.copyfile(path, folder / path.name)
                await until(lambda: len(watched.paths()) == 2, "the interval's scan")
                full = runs.full
                await until(lambda: runs.full >= full + 2, "two more scans")
                group.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="gateway"):
        try:
            anyio.run(main)
        finally:
            watched.gateway.registry.close()
    warnings = [r.getMessage() for r in caplog.records if "not watched" in r.getMessage()]
    assert warnings == [
        f"source {NAME}: changes are not watched (inotify watch limit reached); harvested every 0.3 s instead"
    ]
    assert runs.partial == []


def test_a_link_out_of_the_folder_is_still_refused_when_watched(folder, tmp_path, url, monkeypatch):
    outside = tmp_path / "outside"
    secret = study(outside, n=1, seed=8)[0]
    (outside / "dir").mkdir()
    shutil.copyfile(secret, outside / "dir" / "x.dcm")
    watched, runs = Watched(folder, url), Runs(monkeypatch)

    async def scenario() -> None:
        (folder / "escape.dcm").symlink_to(secret)
        (folder / "escape-dir").symlink_to(outside / "dir")
        await until(lambda: {"escape.dcm", "escape-dir"} <= watched.rejects().keys(), "refused", BOUND)
        # Something written below the linked directory, reported or not, is never listed.
        shutil.copyfile(secret, outside / "dir" / "y.dcm")
        await anyio.sleep(0.5)
        rejects = watched.rejects()
        assert rejects["escape.dcm"] == "a symbolic link leads out of the folder"
        assert "escape-dir" in rejects
        assert watched.paths() == set()

    watched.run(scenario, runs)


def test_a_harvest_of_paths_reads_only_those(folder, tmp_path, url, monkeypatch):
    kept = study(folder / "a", n=3, seed=9)
    gateway = Gateway(make_config(folder, url, NAME))
    try:
        assert gateway.harvest(NAME).indexed == 3
        new = study(folder / "b", n=2, seed=10)
        kept[0].unlink()

        def walked(self, since=None):
            raise AssertionError("a harvest of paths walked the whole folder")

        monkeypatch.setattr(FolderSource, "scan", walked)
        stats = gateway.harvest(NAME, paths={"b", f"a/{kept[0].name}", "a/.hidden", "gone/x.dcm"})
        assert (stats.seen, stats.indexed, stats.removed, stats.failed) == (2, 2, 1, 0)
        held = {r["path"] for r in gateway.registry.query("SELECT path FROM locations")}
        assert held == {f"a/{p.name}" for p in kept[1:]} | {f"b/{p.name}" for p in new}
        # The source's last run is still the last full listing (``gateway sources``).
        assert gateway.registry.last_run(NAME).indexed == 3
    finally:
        gateway.registry.close()


def test_watching_a_folder_that_is_not_there_is_a_source_error(tmp_path):
    async def main() -> None:
        with anyio.fail_after(5):
            await watch_folder(tmp_path / "missing", lambda paths: None, anyio.Event())

    with pytest.raises(SourceError, match="cannot be watched"):
        anyio.run(main)


def test_watch_is_a_filesystem_sources_setting_on_by_default(tmp_path):
    def load(extra: str) -> SourceConfig:
        path = tmp_path / "gateway.toml"
        path.write_text(
            '[registry]\nurl = "sqlite:///r.db"\n[auth]\nopen = true\n'
            f'[[sources]]\nname = "a"\nkind = "filesystem"\npath = "d"\n{extra}'
        )
        return load_config(path).sources[0]

    assert load("").watch is True
    assert load("watch = false\n").watch is False
    with pytest.raises(ConfigError, match=r"sources\[0\]\.watch: expected true or false"):
        load('watch = "yes"\n')


def test_the_memory_source_reports_what_was_added_and_removed(tmp_path, url):
    from gateway.registry.harvest import harvest
    from gateway.registry.store import Registry
    from gateway.stream.memory import MemorySource

    files = study(tmp_path / "staging", n=3, seed=11)
    first, second, third = (path.read_bytes() for path in files)
    source = MemorySource("memory", [first, second], watch=True)
    registry = Registry(url)
    reported: list[set[str]] = []

    async def one_report() -> None:
        stop = anyio.Event()

        def changed(paths: set[str]) -> None:
            reported.append(paths)
            stop.set()

        with anyio.fail_after(5):
            await source.watch_changes(changed, stop)

    try:
        anyio.run(one_report)  # what the constructor added
        assert harvest(registry, source, paths=reported.pop()).indexed == 2
        source.remove(str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID))
        source.add(third)
        anyio.run(one_report)
        stats = harvest(registry, source, paths=reported.pop())
        assert (stats.seen, stats.indexed, stats.removed) == (1, 1, 1)
    finally:
        registry.close()


def test_a_file_found_changed_while_served_is_harvested_again_at_once(tmp_path, url, monkeypatch):
    """Not watched (the watcher would see the write): serving finds the change, refuses it, and
    the service harvests that path at once instead of at the next full scan an hour away."""
    folder = tmp_path / NAME
    files = study(folder / "s1", n=2)
    watched, runs = Watched(folder, url), Runs(monkeypatch)
    watched.source_config = replace(watched.source_config, watch=False)
    source = watched.gateway.sources[NAME]

    async def main() -> None:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(watched.gateway.harvest_forever, watched.source_config)
                await until(lambda: runs.full >= 1, "the first full harvest")
                ds = pydicom.dcmread(files[0])
                ds.PatientName = "Changed^After^Indexing"
                ds.save_as(files[0])
                (location,) = [f for f in all_files(watched) if f.path == "s1/" + files[0].name]
                with pytest.raises(SourceError, match="changed since it was indexed"):
                    async for _ in source.aiter_instance(location):
                        pass
                await until(
                    lambda: frozenset({location.path}) in runs.partial, "a harvest of that path", BOUND
                )
                (again,) = [f for f in all_files(watched) if f.path == location.path]
                data = b"".join([chunk async for chunk in source.aiter_instance(again)])
                assert b"Changed^After^Indexing" in data  # served again, as indexed anew
                group.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        watched.gateway.registry.close()
    assert runs.full == 1


def all_files(watched: Watched) -> list[Any]:
    rows = watched.gateway.registry.query("SELECT StudyInstanceUID FROM studies")
    registry = watched.gateway.registry
    return [
        f for row in rows for group in registry.instance_files({"StudyInstanceUID": row[0]}) for f in group
    ]
