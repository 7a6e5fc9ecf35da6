"""Instance Availability Notification (PS3.4 Annex R) from a PACS that sends it: a real Orthanc
as the PACS (C-FIND answers), a real ``gateway serve`` polling it only every hour, and a pynetdicom
IAN SCU sending the N-CREATE as dcm4chee would (Orthanc and DCMTK send none). What gets indexed is
what Orthanc answers, within ~2 s of the notification instead of at the next poll."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from fixtures.ctstudy import make_ct_study
from gateway.config import SourceConfig
from gateway.errors import SourceError
from gateway.stream.dimse.associations import VERIFICATION
from gateway.stream.dimse.ian import INSTANCE_AVAILABILITY
from gateway.stream.dimse.ianscp import watch_notifications
from peers.gateway import dimse_source, running_gateway
from peers.orthanc import Orthanc, orthanc_missing, running_orthanc
from peers.process import free_port
from tests.conftest import fixture_files

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(orthanc_missing() is not None, reason=str(orthanc_missing())),
]

BOUND = 2.0  # seconds from the notification to the study in QIDO
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    # The gateway's C-FINDs come as GATEWAY: Orthanc answers the modalities it knows.
    known = {"GATEWAY": ["GATEWAY", "127.0.0.1", 104]}
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), modalities=known) as peer:
        peer.upload(fixture_files()[:1])  # the first harvest finds it: then the gateway is up
        yield peer


class Gateway:
    def __init__(self, url: str, ian_port: int) -> None:
        self.url = url
        self.api = url.rsplit("/dicom-web", 1)[0] + "/api"
        self.ian_port = ian_port

    def studies(self) -> dict[str, int]:
        """StudyInstanceUID -> NumberOfStudyRelatedInstances, as QIDO answers."""
        answer = httpx.get(f"{self.url}/studies", timeout=5).json()
        return {s["0020000D"]["Value"][0]: s["00201208"]["Value"][0] for s in answer}

    def announced(self, study: str) -> list[str]:
        changes = httpx.get(f"{self.api}/changes?since=0&limit=1000", timeout=5).json()["changes"]
        return [c["kind"] for c in changes if c["StudyInstanceUID"] == study]


@pytest.fixture(scope="module")
def gateway(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    ian_port = free_port()
    source = (
        dimse_source("orthanc", orthanc.dicom_port, orthanc.aet) + f"interval = 3600\nian_port = {ian_port}\n"
    )
    with running_gateway("[changes]\nquiet_seconds = 0.2\n" + source, tmp_path_factory.mktemp("gw")) as url:
        until(lambda: echo(ian_port), "the IAN SCP answering C-ECHO", 10)
        yield Gateway(url, ian_port)


def until(check: Callable[[], object], what: str, seconds: float = 5.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(0.02)
    return time.monotonic() - start


def scu(calling: str = "ORTHANC", *classes: str) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    for sop_class in classes or (INSTANCE_AVAILABILITY,):
        ae.add_requested_context(sop_class)
    return ae


def echo(port: int) -> bool:
    assoc = scu("ORTHANC", VERIFICATION).associate("127.0.0.1", port, ae_title="GATEWAY")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


def send(port: int, *notices: Dataset, calling: str = "ORTHANC", bind: str | None = None) -> list[int] | None:
    """N-CREATE each notice on one association, as a PACS's IAN SCU does; their statuses, or
    None when the association was not established."""
    sockets: list[socket.socket] = []
    assoc = scu(calling).associate(
        "127.0.0.1",
        port,
        ae_title="GATEWAY",
        bind_address=(bind, 0) if bind else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: sockets.append(event.assoc.dul.socket.socket))],
    )
    if not assoc.is_established:
        for sock in sockets:  # pynetdicom leaves it open when the peer aborted (its shutdown fails)
            sock.close()
        return None
    try:
        statuses = []
        for notice in notices:
            status, _ = assoc.send_n_create(notice, INSTANCE_AVAILABILITY, generate_uid())
            statuses.append(int(status.Status) if status else -1)
        return statuses
    finally:
        assoc.release()


def notice_of(paths: list[Path], availability: str = "ONLINE") -> Dataset:
    """The notification a PACS sends once it holds ``paths`` (one study)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    ds = Dataset()
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.StudyInstanceUID = headers[0].StudyInstanceUID
    by_series: dict[str, Dataset] = {}
    for header in headers:
        item = by_series.get(header.SeriesInstanceUID)
        if item is None:
            item = by_series[header.SeriesInstanceUID] = Dataset()
            item.SeriesInstanceUID = header.SeriesInstanceUID
            item.ReferencedSOPSequence = []
        sop = Dataset()
        sop.ReferencedSOPClassUID = header.SOPClassUID
        sop.ReferencedSOPInstanceUID = header.SOPInstanceUID
        sop.InstanceAvailability = availability
        sop.RetrieveAETitle = "ORTHANC"
        item.ReferencedSOPSequence.append(sop)
    ds.ReferencedSeriesSequence = list(by_series.values())
    return ds


def new_study(tmp_path: Path, orthanc: Orthanc | None, n: int = 3) -> tuple[str, list[Path]]:
    """A study stored in the PACS (not yet known to the gateway, which polls hourly); with no
    ``orthanc``, its files only."""
    seed = secrets.randbelow(10**9)
    paths = make_ct_study(tmp_path / f"study-{seed}", n_instances=n, rows=8, cols=8, seed=seed)
    if orthanc is not None:
        orthanc.upload(paths)
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID), paths


def test_a_study_is_queryable_and_announced_within_the_bound_of_its_notification(gateway, orthanc, tmp_path):
    study, paths = new_study(tmp_path, orthanc)
    time.sleep(0.3)
    assert study not in gateway.studies()  # no poll before an hour: only the notification brings it
    sent = time.monotonic()
    assert send(gateway.ian_port, notice_of(paths)) == [0x0000]
    until(lambda: gateway.studies().get(study) == 3, "the study in QIDO", BOUND)
    took = time.monotonic() - sent
    until(lambda: "study.available" in gateway.announced(study), "study.available on the feed", 3)
    print(f"notification to QIDO: {took:.2f} s")
    assert took < BOUND


def test_a_notification_of_unavailable_instances_still_harvests_what_the_pacs_lists(
    gateway, orthanc, tmp_path
):
    study, paths = new_study(tmp_path, orthanc, n=2)
    assert send(gateway.ian_port, notice_of(paths, "UNAVAILABLE")) == [0x0000]
    until(lambda: gateway.studies().get(study) == 2, "the study in QIDO", BOUND)


def test_a_malformed_notification_gets_its_failure_status_and_the_next_good_one_works(
    gateway, orthanc, tmp_path
):
    study, paths = new_study(tmp_path, orthanc, n=2)
    broken = notice_of(paths)
    del broken.StudyInstanceUID
    wildcard = notice_of(paths)
    wildcard.StudyInstanceUID = "*"
    statuses = send(gateway.ian_port, broken, wildcard, notice_of(paths))
    assert statuses == [0x0120, 0x0106, 0x0000]  # Missing Attribute, Invalid Attribute Value
    until(lambda: gateway.studies().get(study) == 2, "the study in QIDO", BOUND)


def test_a_notification_naming_a_study_the_pacs_does_not_have_adds_nothing(gateway, orthanc, tmp_path):
    absent, absent_paths = new_study(tmp_path, None)  # never stored in the PACS
    study, paths = new_study(tmp_path, orthanc, n=2)
    # Both queued together or in order: once the second is indexed, the first was harvested too.
    assert send(gateway.ian_port, notice_of(absent_paths), notice_of(paths)) == [0x0000, 0x0000]
    until(lambda: gateway.studies().get(study) == 2, "the present study in QIDO", BOUND)
    assert absent not in gateway.studies()


@pytest.mark.parametrize(
    "calling,called", [("INTRUDER", "GATEWAY"), ("ORTHANC", "SOMEONE")], ids=["calling-ae", "called-ae"]
)
def test_an_association_from_another_ae_title_is_rejected(gateway, calling, called):
    assoc = scu(calling).associate("127.0.0.1", gateway.ian_port, ae_title=called)
    assert assoc.is_rejected
    assert echo(gateway.ian_port)  # and the listener keeps serving


def test_a_connection_from_an_address_that_is_not_the_pacs_is_refused(gateway):
    # 127.0.0.2 is loopback too, but not an address the PACS's host (127.0.0.1) resolves to.
    assert send(gateway.ian_port, Dataset(), bind="127.0.0.2") is None


def test_other_sop_classes_are_refused(gateway):
    assoc = scu("ORTHANC", CT).associate("127.0.0.1", gateway.ian_port, ae_title="GATEWAY")
    try:
        assert not assoc.is_established or not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()


def test_a_port_taken_is_a_source_error_and_not_a_crash():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = SourceConfig(
            "pacs", "dimse", host="127.0.0.1", called_ae="ORTHANC", ian_port=taken.getsockname()[1]
        )

        async def main() -> None:
            with pytest.raises(SourceError, match="cannot listen for Instance Availability"):
                with anyio.fail_after(5):
                    await watch_notifications("pacs", config, lambda paths: None, anyio.Event())

        anyio.run(main)
