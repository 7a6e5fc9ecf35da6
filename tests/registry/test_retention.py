"""Retention of the change feed: the oldest events pruned in batches up to a time and to the
subscriptions' lowest cursor, the horizon kept durably, the hourly pass; and what learning a
header says to the feed. On both registry backends."""

# ruff: noqa: F811
from __future__ import annotations

import io
import time
from dataclasses import replace
from pathlib import Path

import anyio
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fixtures.generate import make_ct_study
from gateway.access.store import AccessStore
from gateway.codec.dicomfile import read_header
from gateway.config import load_config
from gateway.errors import RegistryError
from gateway.notify.store import SubscriptionStore
from gateway.registry import changes
from gateway.registry.record import build_record
from gateway.registry.store import Registry
from gateway.service import Gateway
from peers.dcmtk import dcmtk_missing, running_dcmqrscp
from peers.gateway import dimse_source
from tests.backends import Databases
from tests.conftest import make_config
from tests.registry.test_changes import (  # noqa: F401 (fixtures)
    ALICE,
    BOB,
    LATER,
    NIR_OID,
    SOURCE,
    add_study,
    archive,
    gateway,
    kinds,
    url,
)

OLD = 1_000.0  # an event time long past any retention


def age(registry: Registry, times: dict[int, float]) -> None:
    """Give events (by seq) the times ``times`` says."""
    with registry.db.transaction() as conn:
        conn.executemany("UPDATE changes SET time = ? WHERE seq = ?", [(t, s) for s, t in times.items()])


def seqs(registry: Registry) -> list[int]:
    return [c.seq for c in registry.changes(0, 1000)]


# -- pruning -----------------------------------------------------------------------------------------


def test_events_older_than_the_cutoff_go_oldest_first_in_batches_the_last_gone_being_the_horizon(
    gateway, monkeypatch
):
    registry = gateway.registry
    first, second, third, fourth = seqs(registry)
    age(registry, {first: OLD, second: OLD, third: OLD})
    batches: list[int] = []
    real = changes.prune

    def counted(*args, **kwargs):
        batches.append(real(*args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(changes, "prune", counted)
    assert registry.changes_horizon() == 0
    assert registry.prune_changes(older_than=OLD + 1, batch=2) == 3
    assert batches == [2, 1]  # one transaction per batch, the last one short
    assert registry.changes_horizon() == third
    assert seqs(registry) == [fourth]
    assert registry.prune_changes(older_than=OLD + 1, batch=2) == 0  # again: nothing left to do


def test_pruning_stops_at_the_lowest_cursor_of_the_subscriptions(gateway):
    registry = gateway.registry
    everything = seqs(registry)
    age(registry, dict.fromkeys(everything, OLD))
    assert registry.prune_changes(older_than=time.time(), through=everything[1]) == 2
    assert registry.changes_horizon() == everything[1]
    assert seqs(registry) == everything[2:]


def test_only_a_prefix_goes_an_event_too_recent_keeps_the_older_ones_after_it(gateway):
    """Nodes' clocks may disagree: an event with a later seq and an earlier time waits for the
    ones before it, so that the horizon says exactly what is missing."""
    registry = gateway.registry
    first, second, third, fourth = seqs(registry)
    age(registry, {first: OLD, third: OLD, fourth: OLD})  # the second one is recent
    assert registry.prune_changes(older_than=OLD + 1) == 1
    assert registry.changes_horizon() == first
    assert seqs(registry) == [second, third, fourth]


def test_the_horizon_is_durable_and_the_feed_head_never_goes_back(gateway, archive, url):
    everything = seqs(gateway.registry)
    age(gateway.registry, dict.fromkeys(everything, OLD))
    assert gateway.registry.prune_changes(older_than=OLD + 1) == len(everything)
    gateway.registry.close()
    again = Registry(url)
    try:
        assert again.changes(0, 100) == []
        assert again.changes_horizon() == everything[-1]
        # Where a new subscription starts: not 0 on an emptied feed.
        assert again.last_change() == everything[-1]
        add_study(archive, "1.2.826.0.9.5", "B-1", BOB)
        Gateway(make_config(archive, url, name=SOURCE), again).harvest(SOURCE)
        (added,) = again.changes(again.changes_horizon(), 100)
        assert added.seq > everything[-1]
    finally:
        again.close()


def test_a_registry_of_version_7_is_migrated_in_place_its_feed_kept_and_nothing_pruned(gateway, url):
    before = gateway.registry.changes(0, 100)
    counts = gateway.registry.counts()
    with gateway.registry.db.transaction() as conn:
        conn.execute("DROP TABLE feed_meta")
        if gateway.registry.dialect == "sqlite":
            conn.execute("PRAGMA user_version = 7")
        else:
            conn.execute("UPDATE registry_meta SET version = 7")
    gateway.registry.close()
    again = Registry(url)
    try:
        assert again.db.schema_version() == 8
        assert again.counts() == counts and again.changes(0, 100) == before
        assert again.changes_horizon() == 0
        age(again, {before[0].seq: OLD})
        assert again.prune_changes(older_than=OLD + 1) == 1
        assert again.changes_horizon() == before[0].seq
    finally:
        again.close()


# -- the retention pass -----------------------------------------------------------------------------


@pytest.fixture
def subscriptions(tmp_path: Path, registry_urls: Databases):
    store = AccessStore(registry_urls.url(tmp_path / "access.db"))
    yield SubscriptionStore(store.db)
    store.close()


def subscribe(store: SubscriptionStore, cursor: int) -> str:
    made = store.add(
        issuer="https://psc.test/auth", subject="10001", role="professional", organization=None,
        patient=None, channel="rest-hook", endpoint="https://ehr.example/hook", header=None,
        payload="id-only", cursor=cursor,
    )  # fmt: skip
    return made.id


def test_a_pass_prunes_what_is_past_keep_days_and_every_active_subscription_has(gateway, subscriptions):
    everything = seqs(gateway.registry)
    now = time.time()
    age(gateway.registry, dict.fromkeys(everything, now - 31 * 86400))  # past the default 30 days
    subscribe(subscriptions, everything[1])  # behind: events after its cursor stay
    gone = subscribe(subscriptions, 0)
    assert subscriptions.revoke("https://psc.test/auth", "10001", gone)  # revoked: holds nothing back
    assert gateway.config.changes_keep_days == 30
    assert gateway.prune(subscriptions, now) == (2, 0)
    assert seqs(gateway.registry) == everything[2:]
    assert gateway.prune(None, now) == (2, 0)  # without subscriptions, the time bound alone


def test_keep_days_0_keeps_the_feed_forever(gateway, archive, url):
    everything = seqs(gateway.registry)
    age(gateway.registry, dict.fromkeys(everything, OLD))
    forever = Gateway(replace(make_config(archive, url, name=SOURCE), changes_keep_days=0), gateway.registry)
    assert forever.prune(None) == (0, 0)
    assert seqs(gateway.registry) == everything


def test_the_pruning_loop_runs_again_after_a_failed_pass(gateway, caplog):
    calls: list[int] = []
    real = gateway.prune

    def flaky(subscriptions, now=None):
        calls.append(1)
        if len(calls) == 1:
            raise RegistryError("registry write failed: the database went away")
        return real(subscriptions, now)

    gateway.prune = flaky  # type: ignore[method-assign]

    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(gateway.prune_forever, None, 0.01)
            with anyio.fail_after(5):
                while len(calls) < 2:
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()

    anyio.run(main)
    assert "retention: pruning failed: registry write failed" in caplog.text


# -- what learning a header says to the feed ---------------------------------------------------------


def first_location(registry: Registry, study: str) -> str:
    return str(
        registry.query(
            "SELECT l.path FROM locations l JOIN instances i ON i.SOPInstanceUID = l.SOPInstanceUID "
            "JOIN series se ON se.SeriesInstanceUID = i.SeriesInstanceUID WHERE se.StudyInstanceUID = ? "
            "ORDER BY l.SOPInstanceUID LIMIT 1",
            (study,),
        )[0][0]
    )


def learn(registry: Registry, archive: Path, path: str, change=None) -> str | None:
    """Learn the header of the instance at ``path`` (its file, after ``change``), as a DIMSE
    source learns what its C-GET brought."""
    ds = pydicom.dcmread(archive / path)
    if change is not None:
        change(ds)
    sent = io.BytesIO()
    ds.save_as(sent)
    header, pixel = read_header(io.BytesIO(sent.getvalue()))
    record = build_record(header, pixel)
    return registry.learn(SOURCE, path, record, str(ds.file_meta.TransferSyntaxUID), {"remote": 1})


def test_learning_a_header_that_changes_nothing_a_search_shows_appends_nothing(gateway, archive):
    registry = gateway.registry
    registry.announce(1.0, time.time() + LATER)
    last = registry.last_change()

    def instance_level(ds: pydicom.Dataset) -> None:
        ds.ImageComments = "seen by the gateway"  # in the instance's metadata only
        ds.ContentDate = "20240102"  # an instance-level column

    path = first_location(registry, "1.2.826.0.9.2")
    assert learn(registry, archive, path) is None
    assert learn(registry, archive, path, instance_level) is None
    assert registry.changes(last, 100) == []
    assert registry.announce(1.0, time.time() + 2 * LATER) == []  # nothing to announce either


def test_learning_a_header_that_changes_a_study_appends_what_a_harvest_would(gateway, archive):
    registry = gateway.registry
    registry.announce(1.0, time.time() + LATER)
    last = registry.last_change()

    def described(ds: pydicom.Dataset) -> None:
        ds.StudyDescription = "CT thorax, as the header says"

    assert learn(registry, archive, first_location(registry, "1.2.826.0.9.2"), described) is None
    (event,) = registry.changes(last, 100)
    assert kinds([event]) == [("instances.added", "1.2.826.0.9.2", 1)]
    assert (event.source, event.patient) == (SOURCE, ALICE) and event.SeriesInstanceUID
    announced = registry.announce(1.0, time.time() + 2 * LATER)
    assert kinds(announced) == [("study.updated", "1.2.826.0.9.2", 2)]


def test_learning_the_ins_the_search_lacked_appends_an_event_carrying_it(gateway, archive):
    registry = gateway.registry
    last = registry.last_change()

    def identified(ds: pydicom.Dataset) -> None:
        item = Dataset()
        item.PatientID, item.IssuerOfPatientID = "1700199000111", NIR_OID
        ds.OtherPatientIDsSequence = Sequence([item])

    assert learn(registry, archive, first_location(registry, "1.2.826.0.9.4"), identified) is None
    (event,) = registry.changes(last, 100)
    assert (event.kind, event.patient) == ("instances.added", "1700199000111")


def test_learning_for_a_location_no_longer_indexed_writes_nothing(gateway, archive):
    registry = gateway.registry
    path = first_location(registry, "1.2.826.0.9.2")
    with registry.transaction() as conn:  # a harvest removed it while the C-GET ran
        registry.remove_paths(conn, SOURCE, [path])
    counts, last = registry.counts(), registry.last_change()
    refused = learn(registry, archive, path)
    assert refused is not None and "no longer indexed" in refused
    assert registry.counts() == counts and registry.last_change() == last


@pytest.mark.network
@pytest.mark.skipif(dcmtk_missing() is not None, reason=str(dcmtk_missing()))
def test_a_dimse_study_opened_tells_the_feed_once_per_series_what_its_c_find_lacked(tmp_path, url):
    """dcmqrscp's C-FIND gives no SeriesDescription, SeriesDate or BodyPartExamined: the first
    instance retrieved of a series completes what a series search shows (one event); its other
    instances, and the same instances again, change nothing shown (none)."""
    study = "1.2.826.0.9.77"
    files = make_ct_study(tmp_path / "study", n_instances=3, rows=16, cols=16, study_uid=study)
    with running_dcmqrscp(tmp_path / "pacs", files) as pacs:
        (tmp_path / "gateway.toml").write_text(
            f'[registry]\nurl = "{url}"\n[auth]\nopen = true\n'
            + dimse_source(f"pacs-{SOURCE}", pacs.port, pacs.aet)
        )
        gateway = Gateway(load_config(tmp_path / "gateway.toml", env={}))
        try:
            gateway.harvest(f"pacs-{SOURCE}")
            gateway.registry.announce(1.0, time.time() + LATER)
            last = gateway.registry.last_change()
            located = gateway.registry.instance_files({"StudyInstanceUID": study})
            source = gateway.sources[f"pacs-{SOURCE}"]

            async def open_study() -> None:
                for _ in range(2):  # a viewer opening it, then another
                    for alternatives in located:
                        async for _chunk in source.aiter_instance(alternatives[0]):
                            pass
                await source.aclose()

            anyio.run(open_study)
            assert kinds(gateway.registry.changes(last, 100)) == [("instances.added", study, 1)]
            (series,) = gateway.registry.query("SELECT SeriesDescription, BodyPartExamined FROM series")
            assert tuple(series) == ("Axial 1.25mm STANDARD", "CHEST")
        finally:
            gateway.registry.close()
