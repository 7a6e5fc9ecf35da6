"""End to end through a real uvicorn server on a loopback port, driven by dicomweb-client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from fixtures.generate import make_ct_study
from peers.gateway import folder_source, running_gateway
from tests.conftest import FIXTURES
from tests.helpers import assert_frames_and_instance

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_gateway(folder_source("fixtures", FIXTURES), tmp_path_factory.mktemp("live")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> DICOMwebClient:
    return DICOMwebClient(url=server)


def test_search_finds_every_study(client):
    studies = client.search_for_studies()
    expected = {
        str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in FIXTURES.rglob("*.dcm")
    }
    assert {s["0020000D"]["Value"][0] for s in studies} == expected


def test_search_by_patient_name_with_fuzzy_matching(client):
    studies = client.search_for_studies(search_filters={"PatientName": "francoise"}, fuzzymatching=True)
    assert {s["00100010"]["Value"][0]["Alphabetic"] for s in studies} == {"Dupont^Françoise"}


def test_study_metadata_lists_every_instance(client):
    path = next(FIXTURES.rglob("*multiframe*.dcm"))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    metadata = client.retrieve_study_metadata(str(ds.StudyInstanceUID))
    expected = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in FIXTURES.rglob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == ds.StudyInstanceUID
    }
    assert {m["00080018"]["Value"][0] for m in metadata} == expected


@pytest.mark.parametrize("path", sorted(FIXTURES.rglob("*.dcm")), ids=lambda p: Path(p).stem)
def test_instance_and_every_frame_match_the_source_file(server, path):
    assert_frames_and_instance(server, path)


def test_a_transfer_cut_by_the_source_is_seen_as_incomplete_and_the_server_goes_on(tmp_path):
    folder = tmp_path / "archive"
    files = sorted(make_ct_study(folder, n_instances=6, rows=128, cols=128))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    with running_gateway(folder_source("archive", folder), tmp_path) as url:
        files[-1].write_bytes(files[-1].read_bytes()[:-1000])  # the last instance falls short
        accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"{url}/studies/{ds.StudyInstanceUID}", headers=accept, timeout=10)
        assert httpx.get(f"{url}/studies", timeout=10).status_code == 200


def test_a_client_hanging_up_mid_study_does_not_stop_the_server(tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    make_ct_study(folder, n_instances=40, rows=256, cols=256)
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    with running_gateway(folder_source("archive", folder), tmp_path) as url:
        accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        for _ in range(3):
            with httpx.stream(
                "GET", f"{url}/studies/{ds.StudyInstanceUID}", headers=accept, timeout=10
            ) as response:
                assert response.status_code == 200
                next(response.iter_raw(65536))  # read a little, then hang up
        assert httpx.get(f"{url}/studies/{ds.StudyInstanceUID}/metadata", timeout=10).status_code == 200
