"""A PACS over DIMSE as a source, proven against DCMTK's dcmqrscp (C-FIND, C-GET, C-MOVE) and
Orthanc's DIMSE side, both real processes on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from fixtures.generate import make_ct_study
from peers.dcmtk import Dcmqrscp, dcmtk_missing, running_dcmqrscp
from peers.gateway import dimse_source, running_gateway
from peers.process import free_port
from tests.conftest import fixture_files
from tests.helpers import assert_frames_and_instance, expected_frames

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(dcmtk_missing() is not None, reason=str(dcmtk_missing())),
]

ANY_FRAME = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}


def frame_url(gateway: str, ds: pydicom.Dataset, number: int = 1) -> str:
    return (
        f"{gateway}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/{number}"
    )


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dcmqrscp]:
    move_port = free_port()
    with running_dcmqrscp(
        tmp_path_factory.mktemp("dcmqrscp"), fixture_files(), move_destinations={"GATEWAY": move_port}
    ) as peer:
        yield peer


@pytest.fixture(scope="module")
def gateway(pacs: Dcmqrscp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_gateway(dimse_source("dcmqrscp", pacs.port, pacs.aet), tmp_path_factory.mktemp("gw")) as url:
        yield url


def test_c_find_harvest_lists_every_study_with_the_pacs_counts(gateway):
    studies = {s["0020000D"]["Value"][0]: s for s in httpx.get(f"{gateway}/studies").json()}
    files = [pydicom.dcmread(p, stop_before_pixels=True) for p in fixture_files()]
    assert set(studies) == {str(ds.StudyInstanceUID) for ds in files}
    for uid, study in studies.items():
        held = sum(1 for ds in files if ds.StudyInstanceUID == uid)
        assert study["00201208"]["Value"] == [held]


def test_person_names_in_other_character_sets_survive_c_find(gateway):
    studies = httpx.get(f"{gateway}/studies", params={"PatientName": "müller*"}).json()
    assert {s["00100010"]["Value"][0]["Alphabetic"] for s in studies} == {"Müller^Hélène"}


def compressed(path: Path) -> bool:
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed


UNCOMPRESSED = [p for p in fixture_files() if not compressed(p)]
COMPRESSED = [p for p in fixture_files() if compressed(p)]


@pytest.mark.parametrize("path", UNCOMPRESSED, ids=lambda p: Path(p).stem)
def test_c_get_frames_and_instances_equal_the_file(gateway, path):
    assert_frames_and_instance(gateway, path)


@pytest.mark.parametrize("path", COMPRESSED[:2], ids=lambda p: Path(p).stem)
def test_a_pacs_that_cannot_send_a_syntax_gets_a_502_that_says_so(gateway, path):
    # dcmqrscp as configured here accepts only uncompressed storage contexts, so it cannot send
    # compressed instances back over C-GET (status A702): the gateway must say so, not hang.
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    response = httpx.get(frame_url(gateway, ds), headers=ANY_FRAME, timeout=30)
    assert response.status_code == 502
    assert "dcmqrscp" in response.text and "A702" in response.text


def test_c_move_to_the_gateways_own_storage_scp(pacs, tmp_path):
    source = dimse_source(
        "moving", pacs.port, pacs.aet, retrieve="c-move", move_port=pacs.move_destinations["GATEWAY"]
    )
    with running_gateway(source, tmp_path) as gateway:
        for path in fixture_files()[:3]:
            ds = pydicom.dcmread(path)
            response = httpx.get(frame_url(gateway, ds), headers=ANY_FRAME, timeout=30)
            assert response.status_code == 200, response.text
            assert expected_frames(ds)[0] in response.content


def test_a_failed_sub_operation_is_an_error_not_a_success(pacs, tmp_path):
    storage = pacs.storage
    with running_gateway(dimse_source("gappy", pacs.port, pacs.aet), tmp_path) as gateway:
        victim = sorted(storage.glob("*.dcm"))[-1]
        ds = pydicom.dcmread(victim, stop_before_pixels=True)
        content = victim.read_bytes()
        victim.unlink()  # the PACS still lists it, but cannot send it
        try:
            response = httpx.get(frame_url(gateway, ds), headers=ANY_FRAME, timeout=30)
        finally:
            victim.write_bytes(content)
        assert response.status_code == 502
        assert "gappy" in response.text and "failed" in response.text


def test_a_rejected_association_is_named_and_search_still_answers(pacs, tmp_path):
    good = dimse_source("pacs", pacs.port, pacs.aet)
    with running_gateway(good, tmp_path / "a") as gateway:
        studies = {s["0020000D"]["Value"][0] for s in httpx.get(f"{gateway}/studies").json()}
    # Same registry, now with a called AE title the PACS does not know: it rejects the association.
    bad = dimse_source("pacs", pacs.port, "NOT-THE-PACS")
    with running_gateway(bad, tmp_path / "a", wait_for_studies=False) as gateway:
        served = {s["0020000D"]["Value"][0] for s in httpx.get(f"{gateway}/studies").json()}
        assert served == studies  # served from the index
        ds = pydicom.dcmread(fixture_files()[0], stop_before_pixels=True)
        response = httpx.get(frame_url(gateway, ds), headers=ANY_FRAME, timeout=30)
        assert response.status_code == 503
        assert "rejected" in response.text and "pacs" in response.text


def test_a_dead_pacs_at_retrieve_gets_503(tmp_path):
    with running_dcmqrscp(tmp_path / "pacs", fixture_files()[:2]) as pacs:
        stopping = running_gateway(dimse_source("short-lived", pacs.port, pacs.aet), tmp_path / "gw")
        gateway = stopping.__enter__()
    try:
        ds = pydicom.dcmread(fixture_files()[0], stop_before_pixels=True)
        response = httpx.get(frame_url(gateway, ds), headers=ANY_FRAME, timeout=30)
        assert response.status_code == 503
        assert "short-lived" in response.text
    finally:
        stopping.__exit__(None, None, None)


def test_a_silent_pacs_hits_the_deadline_with_a_504(pacs, tmp_path):
    good = dimse_source("pacs", pacs.port, pacs.aet)
    with running_gateway(good, tmp_path / "a"):
        pass  # harvested: the index knows the studies
    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        source = dimse_source("pacs", silent.getsockname()[1], pacs.aet)
        with running_gateway(source, tmp_path / "a", wait_for_studies=False) as gateway:
            ds = pydicom.dcmread(fixture_files()[0], stop_before_pixels=True)
            started = time.monotonic()
            response = httpx.get(frame_url(gateway, ds), headers=ANY_FRAME, timeout=30)
            assert response.status_code == 504
            assert "deadline" in response.text and "pacs" in response.text
            assert time.monotonic() - started < 10  # connect_timeout is 2 s in these tests


def test_a_whole_series_comes_in_one_retrieval_and_equals_the_files(gateway):
    paths = [p for p in UNCOMPRESSED if "GW-0004" in str(p)]  # one series, two instances
    files = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in paths)}
    first = next(iter(files.values()))
    client = DICOMwebClient(url=gateway)
    instances = client.retrieve_study(str(first.StudyInstanceUID), media_types=(("application/dicom", "*"),))
    assert {str(i.SOPInstanceUID) for i in instances} == set(files)
    for instance in instances:
        assert (instance.pixel_array == files[str(instance.SOPInstanceUID)].pixel_array).all()


def test_metadata_before_any_retrieval_holds_the_full_header(pacs, tmp_path):
    ds = pydicom.dcmread(next(p for p in UNCOMPRESSED if "GW-0004" in str(p)), stop_before_pixels=True)
    with running_gateway(dimse_source("fresh", pacs.port, pacs.aet), tmp_path) as gateway:
        searched = httpx.get(
            f"{gateway}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances"
        )
        assert all("00180050" not in item for item in searched.json())  # C-FIND gave no SliceThickness
        url = f"{gateway}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"
        metadata = {item["00080018"]["Value"][0]: item for item in httpx.get(url, timeout=60).json()}
    item = metadata[str(ds.SOPInstanceUID)]
    assert item["00280010"]["Value"] == [ds.Rows]  # from the header, learnt by retrieving it
    assert item["00020010"]["Value"] == [str(ds.file_meta.TransferSyntaxUID)]
    assert item["7FE00010"]["BulkDataURI"].startswith(gateway)


def test_bulk_data_other_than_pixels_comes_over_dimse_too(tmp_path):
    (path,) = make_ct_study(tmp_path / "study", n_instances=1, rows=16, cols=16)
    ds = pydicom.dcmread(path)
    ds.ICCProfile = bytes(range(256)) * 8  # 2 KiB: a BulkDataURI, not inline
    ds.save_as(path)
    with running_dcmqrscp(tmp_path / "pacs", [path]) as pacs:
        with running_gateway(dimse_source("pacs", pacs.port, pacs.aet), tmp_path / "gw") as gateway:
            instance = (
                f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            )
            (metadata,) = httpx.get(f"{gateway}{instance}/metadata", timeout=30).json()
            uri = metadata["00282000"]["BulkDataURI"]
            assert uri == f"{gateway}{instance}/bulk/00282000"
            response = httpx.get(uri, headers=ANY_FRAME, timeout=30)
    assert response.status_code == 200
    assert ds.ICCProfile in response.content


def test_a_plain_accept_gets_explicit_little_endian_before_and_after_the_syntax_is_known(pacs, tmp_path):
    # dicomweb-client's default Accept names no transfer syntax: Explicit VR Little Endian (PS3.18
    # Table 8.7.3-5), as if named. Before the first retrieval the gateway does not know what the PACS
    # stores: big endian and deflated instances come re-encoded, explicit little endian ones as sent.
    paths = [p for p in UNCOMPRESSED if "A1002" in str(p)]  # big endian, deflated, explicit LE
    files = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in paths)}
    study = str(next(iter(files.values())).StudyInstanceUID)
    with running_gateway(dimse_source("plain", pacs.port, pacs.aet), tmp_path) as gateway:
        for attempt in ("syntax unknown", "syntax learnt"):
            instances = DICOMwebClient(url=gateway).retrieve_study(study)
            assert {str(i.SOPInstanceUID) for i in instances} == set(files), attempt
            for instance in instances:
                assert instance.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1", attempt
                assert (instance.pixel_array == files[str(instance.SOPInstanceUID)].pixel_array).all()
