"""One gateway over three kinds of sources at once, with overlapping holdings: a folder, a DIMSE
PACS (dcmqrscp) and a DICOMweb PACS (Orthanc), all real processes on loopback."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from peers.dcmtk import dcmtk_missing, running_dcmqrscp
from peers.gateway import dicomweb_source, dimse_source, folder_source, running_gateway
from peers.orthanc import orthanc_missing, running_orthanc
from tests.conftest import fixture_files
from tests.helpers import expected_frames

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(bool(dcmtk_missing() or orthanc_missing()), reason="needs DCMTK and Orthanc"),
]


def patient(path: Path) -> str:
    return path.parts[-3]  # fixtures/dicom/<PatientID>/<study>/<file>


FILES = fixture_files()
FOLDER = [p for p in FILES if patient(p) in ("GW-0001", "GW-0002")]
DIMSE = [p for p in FILES if patient(p) in ("GW-0002", "GW-0003")]  # GW-0002 overlaps the folder
DICOMWEB = [p for p in FILES if patient(p) in ("GW-0003", "GW-0004")]  # GW-0003 overlaps the PACS


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("federation")
    folder = work / "folder"
    folder.mkdir()
    for path in FOLDER:
        (folder / path.name).write_bytes(path.read_bytes())
    with (
        running_dcmqrscp(work / "dcmqrscp", DIMSE) as pacs,
        running_orthanc(work) as orthanc,
    ):
        orthanc.upload(DICOMWEB)
        sources = (
            folder_source("folder", folder, priority=0)
            + dimse_source("pacs", pacs.port, pacs.aet, priority=1)
            + dicomweb_source("orthanc", orthanc.dicomweb, priority=2)
        )
        with running_gateway(sources, work / "gw") as url:
            # Harvests run side by side at start: wait until all three have been indexed.
            wanted = len(FILES)
            for _ in range(100):
                if len(httpx.get(f"{url}/instances", params={"limit": "1000"}).json()) == wanted:
                    break
                time.sleep(0.2)
            yield url


def test_every_instance_is_listed_once_whatever_holds_it(gateway):
    instances = httpx.get(f"{gateway}/instances", params={"limit": "1000"}).json()
    uids = [item["00080018"]["Value"][0] for item in instances]
    assert len(uids) == len(set(uids)) == len(FILES)


def test_study_counts_are_the_union_of_what_the_sources_hold(gateway):
    held = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in FILES)
    studies = httpx.get(f"{gateway}/studies").json()
    assert {s["0020000D"]["Value"][0]: s["00201208"]["Value"][0] for s in studies} == dict(held)


@pytest.mark.parametrize(
    "path",
    [
        next(p for p in FOLDER if patient(p) == "GW-0002"),  # folder and PACS: the folder wins
        next(p for p in DIMSE if patient(p) == "GW-0003" and "j2k" not in p.name and "jpegls" not in p.name),
        next(p for p in DICOMWEB if patient(p) == "GW-0004"),
    ],
    ids=["folder-and-dimse", "dimse-and-dicomweb", "dicomweb-only"],
)
def test_frames_come_from_whichever_source_can_send_them(gateway, path):
    ds = pydicom.dcmread(path)
    url = (
        f"{gateway}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/1"
    )
    response = httpx.get(
        url,
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert expected_frames(ds)[0] in response.content


def test_an_ins_finds_the_person_in_the_dicomweb_pacs(gateway):
    studies = httpx.get(
        f"{gateway}/studies",
        params={"PatientID": "1234567890123", "IssuerOfPatientID": "1.2.250.1.213.1.4.8"},
    ).json()
    expected = {
        str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
        for p in FILES
        if patient(p) == "GW-0003"
    }
    assert {s["0020000D"]["Value"][0] for s in studies} == expected
