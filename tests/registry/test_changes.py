"""The change feed: what harvest writes and removes, in order, durable, filtered by restriction,
and the announcer's study events once a study is quiet; on both registry backends."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import anyio
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fixtures.generate import make_ct_study
from gateway.config import load_config
from gateway.errors import ConfigError, RegistryError
from gateway.registry import changes
from gateway.registry.store import Registry
from gateway.service import Gateway
from gateway.types import Change, Restriction
from tests.backends import Databases
from tests.conftest import make_config

NIR_OID = "1.2.250.1.213.1.4.8"
ALICE, BOB = "1800175123456", "2900275654321"
LATER = 3600.0  # seconds: "now" far past any quiet period
# The source's name is its harvest lock's key, database-wide on PostgreSQL: one of its own keeps
# these tests clear of other test runs harvesting an "archive" on the same server.
SOURCE = f"feed-{secrets.token_hex(4)}"


def add_study(
    folder: Path, uid: str, patient_id: str, ins: str | None, n: int = 2, first: int = 0
) -> list[Path]:
    """``n`` instances of a one-series study (instances ``first`` to ``first + n - 1`` of it)."""
    made = make_ct_study(folder / f"tmp-{uid}", n_instances=first + n, rows=8, cols=8, study_uid=uid)
    kept = []
    for path in made[first:]:
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.IssuerOfPatientID = patient_id, "SITE"
        if ins:
            item = Dataset()
            item.PatientID, item.IssuerOfPatientID = ins, NIR_OID
            ds.OtherPatientIDsSequence = Sequence([item])
        target = folder / uid / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
        kept.append(target)
    shutil.rmtree(folder / f"tmp-{uid}")
    return kept


@pytest.fixture
def url(tmp_path: Path, registry_urls: Databases) -> str:
    return registry_urls.url(tmp_path / "registry.db")


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    folder = tmp_path / "archive"
    add_study(folder, "1.2.826.0.9.1", "A-1", ALICE, n=3)
    add_study(folder, "1.2.826.0.9.2", "A-1", ALICE)
    add_study(folder, "1.2.826.0.9.3", "B-1", BOB)
    add_study(folder, "1.2.826.0.9.4", "N-1", None)
    return folder


@pytest.fixture
def gateway(archive: Path, url: str):
    gateway = Gateway(make_config(archive, url, name=SOURCE))
    gateway.harvest(SOURCE)
    yield gateway
    gateway.registry.close()


def kinds(found: list[Change]) -> list[tuple[str, str, int]]:
    return [(c.kind, c.StudyInstanceUID, c.instances) for c in found]


# -- harvest's events ---------------------------------------------------------------------------


def test_a_folder_harvest_appends_one_added_event_per_series_with_its_count_and_patient(gateway):
    found = gateway.registry.changes(0, 100)
    assert sorted(kinds(found), key=lambda k: k[1]) == [
        ("instances.added", "1.2.826.0.9.1", 3),
        ("instances.added", "1.2.826.0.9.2", 2),
        ("instances.added", "1.2.826.0.9.3", 2),
        ("instances.added", "1.2.826.0.9.4", 2),
    ]
    assert {c.StudyInstanceUID: c.patient for c in found} == {
        "1.2.826.0.9.1": ALICE,
        "1.2.826.0.9.2": ALICE,
        "1.2.826.0.9.3": BOB,
        "1.2.826.0.9.4": None,
    }
    assert all(c.source == SOURCE and c.SeriesInstanceUID for c in found)
    seqs = [c.seq for c in found]
    assert seqs == sorted(set(seqs)) and gateway.registry.last_change() == seqs[-1]


def test_removed_files_append_a_removed_event_naming_the_patient_of_the_study_gone(gateway, archive):
    shutil.rmtree(archive / "1.2.826.0.9.3")
    last = gateway.registry.last_change()
    gateway.harvest(SOURCE)
    found = gateway.registry.changes(last, 100)
    assert kinds(found) == [("instances.removed", "1.2.826.0.9.3", 2)]
    assert found[0].patient == BOB and found[0].source == SOURCE


def test_a_changed_file_is_added_again_not_removed(gateway, archive):
    path = sorted((archive / "1.2.826.0.9.2").iterdir())[0]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    last = gateway.registry.last_change()
    gateway.harvest(SOURCE)
    assert kinds(gateway.registry.changes(last, 100)) == [("instances.added", "1.2.826.0.9.2", 1)]


def test_a_page_starts_after_since_and_holds_at_most_limit_events(gateway):
    everything = gateway.registry.changes(0, 100)
    assert gateway.registry.changes(everything[0].seq, 2) == everything[1:3]
    assert gateway.registry.changes(everything[-1].seq, 100) == []


def test_the_feed_survives_a_new_registry_on_the_same_database(gateway, archive, url):
    before = gateway.registry.changes(0, 100)
    gateway.registry.close()
    again = Registry(url)
    try:
        assert again.changes(0, 100) == before
        assert again.last_change() == before[-1].seq
        add_study(archive, "1.2.826.0.9.5", "B-1", BOB)
        Gateway(make_config(archive, url, name=SOURCE), again).harvest(SOURCE)
        after = again.changes(before[-1].seq, 100)
        assert kinds(after) == [("instances.added", "1.2.826.0.9.5", 2)]
        assert after[0].seq > before[-1].seq
    finally:
        again.close()


def _as_version_6(registry: Registry) -> None:
    """Make ``registry`` look written by schema version 6: no feed tables, version 6."""
    with registry.db.transaction() as conn:
        conn.execute("DROP TABLE changes")
        conn.execute("DROP TABLE study_activity")
        if registry.dialect == "sqlite":
            conn.execute("PRAGMA user_version = 6")
        else:
            conn.execute("UPDATE registry_meta SET version = 6")


def test_a_registry_of_version_6_is_migrated_in_place_its_studies_counted_as_announced(gateway, archive, url):
    counts = gateway.registry.counts()
    _as_version_6(gateway.registry)
    gateway.registry.close()
    again = Registry(url)
    try:
        assert again.counts() == counts  # kept, not emptied for harvest to refill
        assert again.changes(0, 100) == [] and again.last_change() == 0
        add_study(archive, "1.2.826.0.9.1", "A-1", ALICE, n=1, first=3)  # one more instance
        Gateway(make_config(archive, url, name=SOURCE), again).harvest(SOURCE)
        assert kinds(again.changes(0, 100)) == [("instances.added", "1.2.826.0.9.1", 1)]
        assert kinds(again.announce(1.0, time.time() + LATER)) == [("study.updated", "1.2.826.0.9.1", 4)]
    finally:
        again.close()


# -- ordering with several writers -----------------------------------------------------------------


def test_writers_on_two_registries_give_unique_increasing_seqs_in_commit_order(url, monkeypatch):
    """Each transaction commits a few ms after taking its numbers; a reader polling all along
    must never find, at the end, a number smaller than one it had already seen."""
    writers = [Registry(url), Registry(url)]
    reader = Registry(url)
    flush = changes.flush

    def late_flush(*args, **kwargs):
        written = flush(*args, **kwargs)
        time.sleep(random.random() * 0.004)  # between taking the numbers and the commit
        return written

    monkeypatch.setattr(changes, "flush", late_flush)
    per_thread, threads = 40, []

    def write(registry: Registry, name: str) -> None:
        for i in range(per_thread):
            pending = changes.Pending()
            pending.add(name, f"1.2.3.{i}", f"1.2.3.{i}.1", f"1.2.3.{i}.1.1")
            with registry.db.transaction() as conn:
                changes.flush(conn, registry.dialect, pending)

    for index, registry in enumerate(writers):
        for thread in range(2):
            threads.append(threading.Thread(target=write, args=(registry, f"w{index}-{thread}")))
    seen: list[int] = []
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            seen += [c.seq for c in reader.changes(seen[-1] if seen else 0, 1000)]
        seen += [c.seq for c in reader.changes(seen[-1] if seen else 0, 1000)]
        everything = [c.seq for c in reader.changes(0, 1000)]
        assert len(everything) == len(set(everything)) == 4 * per_thread
        assert everything == sorted(everything)
        assert seen == everything  # nothing committed behind a number already read
    finally:
        for thread in threads:
            thread.join()
        for registry in (*writers, reader):
            registry.close()


# -- what a restriction lets through ---------------------------------------------------------------

MANY = frozenset({ALICE, *(f"{n:013d}" for n in range(100))})  # past the inline bound: an array
RESTRICTIONS = [
    ("everyone", None, {"1", "2", "3", "4"}),
    ("a patient", Restriction(patients=frozenset({ALICE})), {"1", "2"}),
    ("two patients", Restriction(patients=frozenset({ALICE, BOB})), {"1", "2", "3"}),
    ("many patients", Restriction(patients=MANY), {"1", "2"}),
    ("no patient", Restriction(patients=frozenset()), set()),
    ("hidden", Restriction(patients=frozenset({ALICE}), hidden=frozenset({"1.2.826.0.9.2"})), {"1"}),
    ("many hidden", Restriction(patients=MANY, hidden=frozenset({"1.2.826.0.9.2", *MANY})), {"1"}),
    ("a link", Restriction(studies=frozenset({"1.2.826.0.9.3"})), {"3"}),
    (
        "a link hidden",
        Restriction(studies=frozenset({"1.2.826.0.9.3"}), hidden=frozenset({"1.2.826.0.9.3"})),
        set(),
    ),
    ("a study without INS", Restriction(studies=frozenset({"1.2.826.0.9.4"})), {"4"}),
]


@pytest.mark.parametrize(
    ("restriction", "visible"), [r[1:] for r in RESTRICTIONS], ids=[r[0] for r in RESTRICTIONS]
)
def test_a_restriction_lets_through_the_events_of_the_studies_it_lets_see(gateway, restriction, visible):
    found = gateway.registry.changes(0, 100, restriction)
    assert {c.StudyInstanceUID.rsplit(".", 1)[1] for c in found} == visible
    everything = gateway.registry.changes(0, 100)
    assert found == [c for c in everything if c in found]  # in seq order, as they are


# -- the announcer ---------------------------------------------------------------------------------


def test_a_study_is_announced_once_when_quiet_however_many_batches_it_came_in(gateway, archive):
    registry = gateway.registry
    add_study(archive, "1.2.826.0.9.1", "A-1", ALICE, n=2, first=3)
    gateway.harvest(SOURCE)  # a second batch for study 1
    assert registry.announce(1.0, time.time()) == []  # not quiet yet
    announced = registry.announce(1.0, time.time() + LATER)
    assert sorted(kinds(announced), key=lambda k: k[1]) == [
        ("study.available", "1.2.826.0.9.1", 5),
        ("study.available", "1.2.826.0.9.2", 2),
        ("study.available", "1.2.826.0.9.3", 2),
        ("study.available", "1.2.826.0.9.4", 2),
    ]
    assert registry.changes(announced[0].seq - 1, 100) == announced  # appended to the feed
    assert {c.StudyInstanceUID: c.patient for c in announced}["1.2.826.0.9.1"] == ALICE
    assert registry.announce(1.0, time.time() + 2 * LATER) == []  # once per quiet period


def test_a_study_changed_after_its_announcement_is_announced_as_updated(gateway, archive):
    gateway.registry.announce(1.0, time.time() + LATER)
    add_study(archive, "1.2.826.0.9.2", "A-1", ALICE, n=1, first=2)
    gateway.harvest(SOURCE)
    assert gateway.registry.announce(1.0, time.time() + 0.5) == []  # within the quiet period
    assert kinds(gateway.registry.announce(1.0, time.time() + LATER)) == [
        ("study.updated", "1.2.826.0.9.2", 3)
    ]


def test_a_study_whose_last_instance_went_is_announced_as_removed_with_its_patient(gateway, archive):
    gateway.registry.announce(1.0, time.time() + LATER)
    shutil.rmtree(archive / "1.2.826.0.9.3")
    gateway.harvest(SOURCE)
    removed = gateway.registry.announce(1.0, time.time() + LATER)
    assert kinds(removed) == [("study.removed", "1.2.826.0.9.3", 0)]
    assert removed[0].patient == BOB
    assert gateway.registry.announce(1.0, time.time() + 2 * LATER) == []
    add_study(archive, "1.2.826.0.9.3", "B-1", BOB)  # back again: available again
    gateway.harvest(SOURCE)
    assert kinds(gateway.registry.announce(1.0, time.time() + LATER)) == [
        ("study.available", "1.2.826.0.9.3", 2)
    ]


def test_a_study_that_came_and_went_between_two_passes_is_never_announced(gateway, archive):
    shutil.rmtree(archive / "1.2.826.0.9.4")
    gateway.harvest(SOURCE)
    announced = gateway.registry.announce(1.0, time.time() + LATER)
    assert {c.StudyInstanceUID for c in announced} == {"1.2.826.0.9.1", "1.2.826.0.9.2", "1.2.826.0.9.3"}


def test_two_nodes_announcing_at_once_announce_each_study_once(gateway, url):
    others = [Registry(url) for _ in range(3)]
    results: list[list[Change]] = []
    now = time.time() + LATER
    barrier = threading.Barrier(len(others))

    def announce(registry: Registry) -> None:
        barrier.wait()
        results.append(registry.announce(1.0, now))

    threads = [threading.Thread(target=announce, args=(registry,)) for registry in others]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for registry in others:
        registry.close()
    announced = [c.StudyInstanceUID for found in results for c in found]
    assert sorted(announced) == ["1.2.826.0.9.1", "1.2.826.0.9.2", "1.2.826.0.9.3", "1.2.826.0.9.4"]


# -- the announcer loop and its configuration ------------------------------------------------------


def test_the_announcer_loop_announces_quiet_studies_and_survives_a_failed_pass(archive, url, caplog):
    gateway = Gateway(replace(make_config(archive, url, name=SOURCE), changes_quiet=0.05))
    try:
        gateway.harvest(SOURCE)
        real, calls = gateway.registry.announce, []

        def flaky(quiet: float, now: float) -> list[Change]:
            calls.append(quiet)
            if len(calls) == 1:
                raise RegistryError("registry query failed: the database went away")
            return real(quiet, now)

        gateway.registry.announce = flaky  # type: ignore[method-assign]

        def available() -> list[Change]:
            return [c for c in gateway.registry.changes(0, 100) if c.kind == "study.available"]

        async def main() -> None:
            async with anyio.create_task_group() as group:
                group.start_soon(gateway.announce_forever, 0.01)
                with anyio.move_on_after(5):
                    while len(available()) < 4:
                        await anyio.sleep(0.02)
                group.cancel_scope.cancel()

        anyio.run(main)
        assert calls[0] == 0.05  # [changes] quiet_seconds
        assert len(available()) == 4 and len(calls) >= 2
        assert "announcing failed: registry query failed" in caplog.text
    finally:
        gateway.registry.close()


def test_the_quiet_period_is_a_configuration_key(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[registry]\nurl = "sqlite:///r.db"\n[auth]\nopen = true\n[changes]\nquiet_seconds = 2.5\n'
    )
    assert load_config(path, env={}).changes_quiet == 2.5
    path.write_text('[registry]\nurl = "sqlite:///r.db"\n[auth]\nopen = true\n')
    assert load_config(path, env={}).changes_quiet == 1.0
    for wrong, message in (
        ("quiet_seconds = 0", "changes.quiet_seconds: must be a positive"),
        ("quiet = 1", "changes.quiet: unknown key"),
    ):
        path.write_text(f'[registry]\nurl = "sqlite:///r.db"\n[auth]\nopen = true\n[changes]\n{wrong}\n')
        with pytest.raises(ConfigError, match=message):
            load_config(path, env={})
