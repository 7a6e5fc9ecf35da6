"""The prefetch of relevant priors (gateway/prefetch.py): which priors, which sources, its bounds
and its failures, over in-memory sources and a real registry (both backends); and what a batch
may put in a DIMSE source's cache. tests/test_prefetch_dimse.py proves it against a real PACS."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from gateway.config import AuthConfig, Config, PrefetchConfig, ServerConfig, SourceConfig
from gateway.errors import SourceUnavailable
from gateway.prefetch import Prefetch, Warming, plan, prefetching
from gateway.registry.harvest import harvest
from gateway.registry.store import Registry
from gateway.stream import federation as federation_module
from gateway.stream.dimse import source as dimse
from gateway.stream.dimse.source import DimseSource
from gateway.stream.federation import Federation
from gateway.stream.memory import MemorySource
from gateway.types import Change, InstanceFile
from tests.backends import Databases

TODAY = date(2024, 6, 10)
ROOT = "1.2.826.0.1.3680043.10.511.77"
NEW, CHEST, CHEST_OLD, BRAIN, ELSEWHERE = (f"{ROOT}.{n}" for n in (1, 2, 3, 4, 5))
PATIENT = "PF-1"
DEFAULTS = PrefetchConfig()


def instance(study: str, series: int, number: int, modality: str, part: str, day: str) -> Dataset:
    """A small CT-like instance of ``PATIENT``: study, series (by number) and instance number."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    uid = f"{study}.{series}.{number}"
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.{series}"
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = PATIENT, "SITE", "Prefetch^Patient"
    ds.StudyDate, ds.StudyTime, ds.StudyDescription = day, "100000", f"{modality} {part}"
    ds.Modality, ds.BodyPartExamined = modality, part
    ds.SeriesNumber, ds.InstanceNumber = series, number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(64))
    return ds


def study(uid: str, modality: str, part: str, day: str, series: int = 1, each: int = 2) -> list[Dataset]:
    return [
        instance(uid, s, n, modality, part, day) for s in range(1, series + 1) for n in range(1, each + 1)
    ]


class Site:
    """A registry harvested from three in-memory sources: ``pacs`` (a DIMSE-like source with
    ``prefetch = true``: headers learnt on retrieve, batch retrieval) holding the CT chest
    priors and an MR brain; ``slow`` (the same kind, without prefetch) holding another CT chest
    prior; ``inbox`` (a folder-like source) holding the new CT chest study."""

    def __init__(self, url: str, learnt: list[str]) -> None:
        def learn(path: str, data: bytes) -> None:
            learnt.append(path.rsplit("/", 1)[-1])

        self.pacs = MemorySource(
            "pacs",
            study(CHEST, "CT", "CHEST", "20240301", series=2, each=3)
            + study(CHEST_OLD, "CT", "CHEST", "20150101")
            + study(BRAIN, "MR", "BRAIN", "20240501"),
            batch=True,
            learns_on_retrieve=True,
            learn=learn,
        )
        self.slow = MemorySource(
            "slow", study(ELSEWHERE, "CT", "CHEST", "20231201"), batch=True, learns_on_retrieve=True
        )
        self.inbox = MemorySource("inbox", study(NEW, "CT", "CHEST", "20240610"))
        self.sources = {s.name: s for s in (self.pacs, self.slow, self.inbox)}
        self.config = Config(
            ServerConfig(),
            url,
            (
                SourceConfig("pacs", "dimse", host="127.0.0.1", prefetch=True, priority=0),
                SourceConfig("slow", "dimse", host="127.0.0.1", priority=1),
                SourceConfig("inbox", "filesystem", Path("/inbox"), priority=2),
            ),
            auth=AuthConfig(open=True),
        )
        self.registry = Registry(url)
        self.registry.ranks = {c.name: c.priority for c in self.config.sources}
        for source in self.sources.values():
            harvest(self.registry, source)
        self.federation = Federation(self.sources, self.registry.ranks)  # type: ignore[arg-type]

    def plan(self, config: PrefetchConfig = DEFAULTS, new: str = NEW) -> list[Warming]:
        return plan(self.registry, self.federation, {"pacs"}, new, config, TODAY)

    def prefetch(self, config: PrefetchConfig = DEFAULTS) -> Prefetch:
        return Prefetch(config, self.registry, self.federation, {"pacs"}, today=lambda: TODAY)


@pytest.fixture
def learnt() -> list[str]:
    return []


@pytest.fixture
def site(tmp_path: Path, registry_urls: Databases, learnt: list[str]) -> Iterator[Site]:
    made = Site(registry_urls.url(tmp_path / "registry.db"), learnt)
    yield made
    made.registry.close()


def announced(*studies: str, kind: str = "study.available") -> list[Change]:
    return [Change(n, 0.0, kind, "", uid, None, None, 2) for n, uid in enumerate(studies, 1)]


def sop_uids(warming: Warming) -> list[list[str]]:
    return [[f.SOPInstanceUID for f in files] for files in warming.series]


async def until(condition: Any, seconds: float = 5.0) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.005)


def running(prefetch: Prefetch, work: Any) -> None:
    """``work()`` with ``prefetch`` running beside it."""

    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(prefetch.run)
            await work()
            group.cancel_scope.cancel()

    anyio.run(main)


# -- which priors, from which sources ------------------------------------------------------------


def test_the_best_priors_sharing_modality_or_region_are_warmed_series_by_series(site):
    planned = site.plan()
    # CHEST (same modality and region, recent) then ELSEWHERE (on ``slow``: left out below),
    # then CHEST_OLD; the MR brain shares nothing with a CT chest and is never a prior to open.
    assert [(w.prior, w.source) for w in planned] == [(CHEST, "pacs")]
    assert sop_uids(planned[0]) == [
        [f"{CHEST}.1.{n}" for n in (1, 2, 3)],
        [f"{CHEST}.2.{n}" for n in (1, 2, 3)],
    ]


def test_more_priors_asked_reach_further_down_the_ranking(site):
    planned = site.plan(PrefetchConfig(priors=3))
    assert [w.prior for w in planned] == [CHEST, CHEST_OLD]  # ELSEWHERE ranked between, not here


def test_a_prior_held_only_on_a_source_without_prefetch_is_not_warmed(site):
    assert ELSEWHERE not in {w.prior for w in site.plan(PrefetchConfig(priors=5))}


def test_an_instance_a_faster_source_serves_first_is_not_warmed(site):
    site.inbox.add(instance(CHEST, 1, 1, "CT", "CHEST", "20240301"))  # a copy in the folder
    harvest(site.registry, site.inbox)
    site.federation.priorities["inbox"] = -1  # preferred over the PACS
    assert sop_uids(site.plan()[0])[0] == [f"{CHEST}.1.2", f"{CHEST}.1.3"]


def test_max_instances_bounds_one_new_studys_retrievals_in_reading_order(site):
    planned = site.plan(PrefetchConfig(priors=3, max_instances=4))
    assert [sop_uids(w) for w in planned] == [[[f"{CHEST}.1.{n}" for n in (1, 2, 3)], [f"{CHEST}.2.1"]]]


@pytest.mark.parametrize(
    ("day", "within", "warms"),
    [("20240610", 0, True), ("20240603", 7, True), ("20240602", 7, False), ("", 7, False)],
    ids=["today", "within-days", "too-old", "undated"],
)
def test_only_a_study_dated_within_the_window_is_new(site, day, within, warms):
    # A first harvest of an archive announces its whole history: not patients arriving.
    late = f"{ROOT}.9"
    site.inbox.add(replace_date(instance(late, 1, 1, "CT", "CHEST", "20240610"), day))
    harvest(site.registry, site.inbox)
    assert bool(site.plan(PrefetchConfig(within_days=within), new=late)) is warms


def replace_date(ds: Dataset, day: str) -> Dataset:
    ds.StudyDate = day
    return ds


def test_the_sources_that_prefetch_opt_in_and_learn_on_retrieve(site):
    assert prefetching(site.config, site.sources) == {"pacs"}
    site.pacs.learns_on_retrieve = False  # a source that answers with whole headers anyway
    assert prefetching(site.config, site.sources) == set()


# -- the retrievals -------------------------------------------------------------------------------


def test_a_new_study_announced_warms_its_priors_in_one_retrieval_per_series(site, learnt, caplog):
    caplog.set_level(logging.INFO, "gateway.prefetch")
    prefetch = site.prefetch()

    async def work() -> None:
        assert prefetch.offer(announced(NEW)) == 1
        await until(lambda: len(learnt) == 6)

    running(prefetch, work)
    batches = [asked for asked in site.pacs.asked if asked[0] == "instances"]
    assert [len(asked) - 1 for asked in batches] == [3, 3]  # one per series
    assert sorted(learnt) == sorted(f"{CHEST}.{s}.{n}" for s in (1, 2) for n in (1, 2, 3))
    (line,) = [r.getMessage() for r in caplog.records if "warmed" in r.getMessage()]
    assert CHEST in line and NEW in line and "6 instances of 2 series" in line
    assert PATIENT not in caplog.text and "Prefetch^Patient" not in caplog.text  # UIDs only


def test_an_update_of_a_study_warms_nothing_again(site):
    prefetch = site.prefetch()
    assert prefetch.offer(announced(NEW, kind="study.updated")) == 0
    prefetch.close()


def test_a_prior_warmed_recently_is_not_retrieved_again(site, learnt):
    prefetch = site.prefetch()
    other = f"{ROOT}.8"  # a second new study of the same patient, minutes later
    site.inbox.add(instance(other, 1, 1, "CT", "CHEST", "20240610"))
    harvest(site.registry, site.inbox)

    async def work() -> None:
        prefetch.offer(announced(NEW))
        await until(lambda: len(learnt) == 6)
        prefetch.offer(announced(other))
        await anyio.sleep(0.2)

    running(prefetch, work)
    assert len([a for a in site.pacs.asked if a[0] == "instances"]) == 2


def test_one_retrieval_per_source_at_a_time(site, monkeypatch):
    busy, most = 0, 0
    real = site.pacs.aiter_instances

    async def counted(locations: list[InstanceFile]) -> AsyncIterator[bytes]:
        nonlocal busy, most
        busy += 1
        most = max(most, busy)
        try:
            await anyio.sleep(0.02)
            async for data in real(locations):
                yield data
        finally:
            busy -= 1

    monkeypatch.setattr(site.pacs, "aiter_instances", counted)
    prefetch = site.prefetch(PrefetchConfig(priors=3))
    done: list[int] = []
    real_warm = prefetch.warm

    async def warm(warming: Warming) -> int:
        done.append(await real_warm(warming))
        return done[-1]

    monkeypatch.setattr(prefetch, "warm", warm)

    async def work() -> None:
        prefetch.offer(announced(NEW))
        await until(lambda: len(done) == 2)  # CHEST (2 series) and CHEST_OLD (1)

    running(prefetch, work)
    assert most == 1 and done == [6, 2]


def test_a_failure_is_logged_and_the_next_study_still_warms(site, learnt, caplog):
    site.pacs.error = SourceUnavailable("source pacs: connection refused")
    prefetch = site.prefetch()
    other = f"{ROOT}.8"
    site.inbox.add(instance(other, 1, 1, "CT", "CHEST", "20240610"))
    harvest(site.registry, site.inbox)

    async def work() -> None:
        prefetch.offer(announced(NEW))
        await until(lambda: "failed after 0 of 6 instances: source pacs: connection refused" in caplog.text)
        site.pacs.error = None
        prefetch._warmed.clear()  # as if the warm-again window had passed
        prefetch.offer(announced(other))
        await until(lambda: len(learnt) == 6)

    running(prefetch, work)


def test_a_retrieval_past_its_deadline_is_given_up(site, caplog, monkeypatch):
    monkeypatch.setattr(federation_module, "_DOWN_FOR", 0.0)
    site.pacs.delay, site.pacs.deadline = math.inf, math.inf  # a PACS that never answers
    prefetch = site.prefetch(PrefetchConfig(timeout=0.05))

    async def work() -> None:
        prefetch.offer(announced(NEW))
        await until(lambda: "no end within 0.05 s" in caplog.text)

    running(prefetch, work)


def test_offering_never_blocks_and_drops_past_the_queue(site, caplog):
    prefetch = site.prefetch()  # not running: nothing is taken off the queue
    uids = [f"{ROOT}.100.{n}" for n in range(150)]
    assert prefetch.offer(announced(*uids)) == 100
    assert prefetch.offer(announced(*uids[:10])) == 0  # already waiting: not queued twice
    assert "50 new studies not prefetched" in caplog.text
    prefetch.close()


def test_without_a_prefetching_source_nothing_is_queued(site):
    prefetch = Prefetch(PrefetchConfig(), site.registry, site.federation, set())
    assert prefetch.offer(announced(NEW)) == 0
    prefetch.close()


# -- what a batch may keep in a DIMSE source's cache ----------------------------------------------


def dimse_source() -> DimseSource:
    return DimseSource(SourceConfig(name="pacs", kind="dimse", host="127.0.0.1", port=104))


def test_a_batch_fills_only_the_room_the_cache_has_spare(monkeypatch):
    monkeypatch.setattr(dimse, "_CACHE_BYTES", 250)
    cache = dimse_source()
    cache._remember("viewed", b"v" * 100)
    for uid in ("b1", "b2", "b3"):
        cache._remember(uid, b"b" * 100, spare=True)
    assert set(cache._cache) == {"viewed", "b1"} and cache._cached == 200  # b2 would not fit


def test_a_batched_instance_goes_first_when_a_viewer_needs_room(monkeypatch):
    monkeypatch.setattr(dimse, "_CACHE_BYTES", 300)
    cache = dimse_source()
    cache._remember("viewed", b"v" * 100)
    cache._remember("b1", b"b" * 100, spare=True)
    cache._remember("b2", b"b" * 100, spare=True)
    assert list(cache._cache) == ["b2", "b1", "viewed"]  # the batch's first instance outlives its last
    cache._remember("next", b"n" * 100)  # a viewer's own retrieval
    assert list(cache._cache) == ["b1", "viewed", "next"]


def test_a_batch_never_moves_a_copy_a_viewer_keeps(monkeypatch):
    monkeypatch.setattr(dimse, "_CACHE_BYTES", 300)
    cache = dimse_source()
    cache._remember("a", b"a" * 100)
    cache._remember("b", b"b" * 100)
    cache._remember("a", b"a" * 100, spare=True)  # came again in a series retrieve
    assert list(cache._cache) == ["a", "b"] and cache._cached == 200
