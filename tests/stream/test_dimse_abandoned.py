"""A C-GET or C-MOVE whose consumer stops reading is stopped at once: its worker thread ends, the
PACS is asked to stop (C-CANCEL, PS3.7 9.3.3.3 and 9.3.4.3), what still comes is refused and
never cached or learnt, and the association goes back to the pool or is aborted, never held.

The hand-off from the worker thread without a PACS; the rest against DCMTK's dcmqrscp."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pydicom
import pytest
from pynetdicom import AE, evt

from fixtures.ctstudy import make_ct_study
from gateway.config import Deadlines, SourceConfig
from gateway.stream.dimse import retrieve as dimse_retrieve
from gateway.stream.dimse.associations import STUDY_FIND, STUDY_GET, SYNTAXES, VERIFICATION, AssociationPool
from gateway.stream.dimse.replies import Replies
from gateway.stream.dimse.source import DimseSource
from gateway.types import InstanceFile
from peers.dcmtk import Dcmqrscp, dcmtk_missing, running_dcmqrscp
from peers.gateway import dimse_source, running_gateway
from peers.process import free_port
from tests.helpers import serving

SERIES = 30  # instances in the series retrieved
READ = 3  # instances the consumer reads before it goes away
UIDS = ("1.2.3", "1.2.3.4", ["1.2.3.4.5", "1.2.3.4.6"])
needs_dcmtk = pytest.mark.skipif(dcmtk_missing() is not None, reason=str(dcmtk_missing()))


# -- the hand-off from the worker thread: no PACS -------------------------------------------------


def hand_off(retrieval_of, total: float, stop_after: float | None, read: bool = False) -> tuple[bool, float]:
    """``handoff`` from a worker thread into a full queue of size 1 that nobody reads (unless
    ``read``), the retrieval stopped after ``stop_after`` seconds: what it returned, how long it took."""

    async def main() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue(1)
        queue.put_nowait("waiting already")
        retrieval = retrieval_of()
        started = time.monotonic()
        job = loop.run_in_executor(None, dimse_retrieve.handoff, loop, queue, "next", retrieval, total)
        if read:
            await asyncio.sleep(0.1)
            assert await queue.get() == "waiting already"
        if stop_after is not None:
            await asyncio.sleep(stop_after)
            retrieval.stop("the consumer stopped reading")
        put = await job
        return put, time.monotonic() - started

    return asyncio.run(main())


def a_retrieval() -> dimse_retrieve._Retrieval:
    return dimse_retrieve._Retrieval(UIDS, lambda item: True)


def test_a_waiting_hand_off_gives_up_as_soon_as_the_consumer_left():
    put, took = hand_off(a_retrieval, total=600, stop_after=0.2)
    assert put is False
    assert took < 0.2 + 0.3  # not the 600 s total: it looks every _STEP


def test_a_hand_off_to_a_consumer_that_reads_is_delivered():
    put, took = hand_off(a_retrieval, total=600, stop_after=None, read=True)
    assert put is True and took < 1


def test_a_consumer_that_reads_nothing_for_the_total_deadline_stops_the_retrieval():
    retrieval = a_retrieval()
    put, took = hand_off(lambda: retrieval, total=0.3, stop_after=None)
    assert put is False and 0.3 <= took < 1
    assert retrieval.stopped.is_set() and "0.3 s" in retrieval.why


def test_a_stopped_retrieval_hands_off_nothing_and_waits_for_nothing():
    retrieval = a_retrieval()
    retrieval.stop("the consumer stopped reading")
    put, took = hand_off(lambda: retrieval, total=600, stop_after=None)
    assert put is False and took < 0.1


def test_an_instance_for_a_stopped_retrieval_is_refused_unread():
    config = SourceConfig(name="pacs", kind="dimse", host="127.0.0.1", port=104)
    with ThreadPoolExecutor(1) as threads:
        retriever = dimse_retrieve.Retriever(
            config, AssociationPool("pacs", config), Replies("pacs", config.deadlines), lambda: threads
        )
    retrieval = a_retrieval()
    retrieval.stop("the consumer stopped reading")

    def unread() -> bytes:
        raise AssertionError("the data set of an unwanted instance is read")

    event = SimpleNamespace(
        request=SimpleNamespace(AffectedSOPInstanceUID=UIDS[2][0]), encoded_dataset=unread
    )
    assert retriever._received(event, lambda _: retrieval) == dimse_retrieve._UNWANTED
    assert retrieval.unwanted == 1 and retrieval.delivered == 0 and not retrieval.refused


# -- against dcmqrscp: C-GET and C-MOVE ----------------------------------------------------------


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_ct_study(tmp_path_factory.mktemp("series"), n_instances=SERIES, rows=128, cols=128, seed=77)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, series: list[Path]) -> Iterator[Dcmqrscp]:
    if dcmtk_missing() is not None:
        pytest.skip(str(dcmtk_missing()))
    with running_dcmqrscp(
        tmp_path_factory.mktemp("dcmqrscp"), series, move_destinations={"GATEWAY": free_port()}
    ) as peer:
        yield peer


def locations(series: list[Path]) -> list[InstanceFile]:
    found = []
    for path in series:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.append(
            InstanceFile(
                source="pacs",
                path=f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
                size=path.stat().st_size,
                mode="remote",
                TransferSyntaxUID=None,  # as a C-FIND harvest indexes it: not learnt yet
                SOPInstanceUID=str(ds.SOPInstanceUID),
                SOPClassUID=str(ds.SOPClassUID),
            )
        )
    return found


class Learnt:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, path: str, data: bytes) -> None:
        with self._lock:
            self.paths.append(path)


def dimse(pacs: Dcmqrscp, retrieve: str, learn: Learnt) -> DimseSource:
    config = SourceConfig(
        name="pacs",
        kind="dimse",
        host="127.0.0.1",
        port=pacs.port,
        called_ae=pacs.aet,
        calling_ae="GATEWAY",
        retrieve=retrieve,
        move_destination_port=pacs.move_destinations["GATEWAY"] if retrieve == "c-move" else None,
        # The total deadline is what an abandoned retrieval used to hold its thread for, per
        # instance: far longer than this test may run.
        deadlines=Deadlines(connect=2, message=3, total=600),
    )
    return DimseSource(config, learn)


async def settled(source: DimseSource, within: float) -> float:
    """Seconds until no worker thread and no association is busy for ``source``."""
    started = time.monotonic()
    while source._retriever.running() or source._associations.busy_count():
        assert time.monotonic() - started < within, "the abandoned retrieval still holds its thread"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def read_some(source: DimseSource, files: list[InstanceFile], how: str) -> None:
    """Read ``READ`` instances of the series, then go away the way ``how`` says."""
    if how == "closed":  # the HTTP body generator closed: a viewer hung up
        instances = source.aiter_instances(files)
        for _ in range(READ):
            await instances.__anext__()
        await instances.aclose()
    else:  # a prefetch's timeout: cancelled while working on an instance, the generator dropped
        read = 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                async for _ in source.aiter_instances(files):
                    read += 1
                    if read == READ:
                        await asyncio.sleep(30)


ABANDON = [("c-get", "closed"), ("c-get", "cancelled"), ("c-move", "closed")]


@needs_dcmtk
@pytest.mark.network
@pytest.mark.parametrize("retrieve, how", ABANDON, ids=[f"{r}-{h}" for r, h in ABANDON])
def test_an_abandoned_retrieval_frees_its_thread_and_association_at_once(pacs, series, caplog, retrieve, how):
    caplog.set_level(logging.INFO, logger="gateway.dimse")
    learnt = Learnt()
    source = dimse(pacs, retrieve, learnt)
    files = locations(series)

    async def main() -> None:
        try:
            await read_some(source, files, how)
            took = await settled(source, within=2.0)
            # Ended by the PACS on our C-CANCEL, then released, not pooled: dcmqrscp answers no
            # C-GET on its other associations while a cancelled one stays open.
            assert source._associations.idle_count() == 0 and source._associations.discarded_count() == 1
            assert len(learnt.paths) == READ and len(source._cache) == READ  # nothing after the stop
            # The same source, at once: a whole series.
            started = time.monotonic()
            received = [data async for data in source.aiter_instances(files)]
            assert len(received) == SERIES and time.monotonic() - started < 5
            logging.getLogger("test").info("settled in %.2f s", took)
        finally:
            await source.aclose()

    asyncio.run(main())
    stopped = [r.getMessage() for r in caplog.records if " stopped after " in r.getMessage()]
    assert len(stopped) == 1, stopped
    assert stopped[0].startswith("source pacs: ") and "the consumer stopped reading" in stopped[0]
    assert "association released" in stopped[0]


# -- a PACS that goes on sending after the C-CANCEL: the association is aborted --------------------


@contextlib.contextmanager
def stubborn_pacs(series: list[Path]) -> Iterator[int]:
    """A Q/R SCP (pynetdicom) whose first C-GET sends one instance every 0.1 s and ignores a
    C-CANCEL (its handler never looks at ``event.is_cancelled``); later C-GETs go at full speed."""
    instances = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(path) for path in series)}
    ae = AE(ae_title="STUBBORN")
    for model in (VERIFICATION, STUDY_FIND, STUDY_GET):
        ae.add_supported_context(model)
    ae.add_supported_context(
        next(iter(instances.values())).SOPClassUID, SYNTAXES, scu_role=False, scp_role=True
    )
    gets: list[str] = []

    def on_get(event):
        asked = event.identifier.SOPInstanceUID
        asked = [asked] if isinstance(asked, str) else list(asked)
        gets.append("C-GET")
        slow = len(gets) == 1
        yield len(asked)
        for uid in asked:
            if slow:
                time.sleep(0.1)
            yield 0xFF00, instances[uid]

    handlers = [(evt.EVT_C_GET, on_get)]
    with serving(ae, handlers) as port:
        yield port


@pytest.mark.network
def test_a_pacs_that_ignores_the_c_cancel_loses_the_association_within_the_message_deadline(series, caplog):
    caplog.set_level(logging.INFO, logger="gateway.dimse")
    files = locations(series)
    with stubborn_pacs(series) as port:
        config = SourceConfig(
            name="pacs",
            kind="dimse",
            host="127.0.0.1",
            port=port,
            called_ae="STUBBORN",
            deadlines=Deadlines(connect=2, message=1, total=600),
        )
        source = DimseSource(config, Learnt())

        async def main() -> None:
            try:
                await read_some(source, files, "closed")
                await settled(source, within=1 + 1.5)  # the message deadline after the C-CANCEL
                # Aborted, never pooled: nobody knows what state a C-GET half done left it in.
                assert source._associations.idle_count() == 0 and source._associations.discarded_count() == 1
                received = [data async for data in source.aiter_instances(files)]  # a new association
                assert len(received) == SERIES
            finally:
                await source.aclose()

        asyncio.run(main())
    (stopped,) = [r.getMessage() for r in caplog.records if " stopped after " in r.getMessage()]
    assert "did not end it within 1 s of a C-CANCEL: association aborted" in stopped


# -- through the HTTP app: a viewer hangs up during a series retrieve -----------------------------


@needs_dcmtk
@pytest.mark.network
def test_a_client_that_hangs_up_mid_series_stops_the_c_get_and_the_next_one_works(pacs, series, tmp_path):
    first = pydicom.dcmread(series[0], stop_before_pixels=True)
    url = f"/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    with running_gateway(dimse_source("pacs", pacs.port, pacs.aet), tmp_path) as gateway:
        log = tmp_path / "gateway.log"
        with httpx.stream("GET", gateway + url, headers=accept, timeout=30) as response:
            assert response.status_code == 200
            read = 0
            for chunk in response.iter_raw():
                read += len(chunk)
                if read > 3 * 128 * 128 * 2:  # a few instances' worth
                    break
        hung_up = time.monotonic()
        while " stopped after " not in log.read_text():
            assert time.monotonic() - hung_up < 2, log.read_text()[-2000:]
            time.sleep(0.02)
        (stopped,) = [line for line in log.read_text().splitlines() if " stopped after " in line]
        assert "source pacs: C-GET" in stopped and "association released" in stopped
        whole = httpx.get(gateway + url, headers=accept, timeout=30)
        assert whole.status_code == 200, whole.text + log.read_text()[-3000:]
        assert whole.content.count(b"Content-Type: application/dicom") == SERIES
