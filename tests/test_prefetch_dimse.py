"""Prefetch against a real PACS: DCMTK's dcmqrscp holds a patient's prior, a new study of that
patient lands in a watched folder, and once it is announced the gateway retrieves the prior by
itself: its headers are learnt (its /metadata has what C-FIND does not give) without any viewer
request, and the PACS served the retrieval."""

from __future__ import annotations

import sqlite3
import time
from datetime import date
from pathlib import Path

import httpx
import pydicom
import pytest

from fixtures.ctstudy import make_ct_study
from peers.dcmtk import dcmtk_missing, running_dcmqrscp
from peers.gateway import dimse_source, folder_source, running_gateway

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(dcmtk_missing() is not None, reason=str(dcmtk_missing())),
]

ROOT = "1.2.826.0.1.3680043.10.511.78"
PRIOR, NEW = f"{ROOT}.1", f"{ROOT}.2"
JSON = {"Accept": "application/dicom+json"}


def learnt(registry: Path) -> int:
    """Instances of the PACS whose whole header the gateway has learnt (read from its registry,
    not over HTTP: asking for /metadata would itself retrieve them)."""
    with sqlite3.connect(f"file:{registry}?mode=ro", uri=True) as db:
        query = "SELECT COUNT(*) FROM locations WHERE source = 'pacs' AND TransferSyntaxUID IS NOT NULL"
        return int(db.execute(query).fetchone()[0])


def test_a_new_study_in_a_folder_warms_its_prior_held_on_the_pacs(tmp_path):
    prior = make_ct_study(tmp_path / "prior", n_instances=3, rows=16, cols=16, seed=78, study_uid=PRIOR)
    new = make_ct_study(tmp_path / "made", n_instances=2, rows=16, cols=16, seed=78, study_uid=NEW)
    today = date.today().strftime("%Y%m%d")  # a new study: dated today, of the same patient
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with running_dcmqrscp(tmp_path / "pacs", prior) as pacs:
        sources = dimse_source("pacs", pacs.port, pacs.aet) + "prefetch = true\n"
        sources += folder_source("inbox", inbox, priority=1)
        sources += "[changes]\nquiet_seconds = 0.2\n"
        work = tmp_path / "gateway"
        with running_gateway(sources, work) as gateway:
            registry = work / "registry.db"
            assert learnt(registry) == 0  # C-FIND alone: nothing learnt yet
            for path in new:
                ds = pydicom.dcmread(path)
                ds.StudyDate = today
                ds.save_as(inbox / path.name)
            deadline = time.monotonic() + 15
            while "prefetch: prior" not in (log := (work / "gateway.log").read_text()):
                assert time.monotonic() < deadline, log
                time.sleep(0.05)
            assert learnt(registry) == 3, log
            # the PACS answered one C-GET for the series; the log names studies, not the patient
            assert "source pacs: 3 instances of series" in log
            (line,) = [line for line in log.splitlines() if "prefetch: prior" in line]
            assert f"prior {PRIOR} of study {NEW} warmed from source pacs: 3 instances" in line
            assert "BENCH-78" not in line and "Bench^" not in line
            metadata = httpx.get(f"{gateway}/studies/{PRIOR}/metadata", headers=JSON, timeout=10)
            assert metadata.status_code == 200
            assert [item["00280010"]["Value"] for item in metadata.json()] == [[16]] * 3  # Rows
            # answered from what was learnt: no retrieval for it
            retrievals = (work / "gateway.log").read_text().count("in one retrieval")
            assert retrievals == 1
