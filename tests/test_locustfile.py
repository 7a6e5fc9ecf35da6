"""The load profiles of bench/locustfile.py, run headless for a few seconds against a real gateway
on the bundled fixtures: every profile's requests are made, and none fails."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peers.gateway import folder_source, running_gateway
from tests.conftest import FIXTURES, ROOT

# (method, name) of the requests each profile must have made, as named in the locustfile. A
# portal user revokes a link only from its third one on, so DELETE is not required in 8 s.
MAIN_REQUESTS = {
    "Radiologist": [
        ("GET", "/studies [worklist]"),
        ("GET", "/studies?StudyInstanceUID"),
        ("GET", "/studies?PatientID"),
        ("GET", "/studies/{s}/series"),
        ("GET", "/studies/{s}/series/{se}/metadata"),
        ("GET", "/frames"),
    ],
    "PortalUser": [
        ("GET", "/studies?PatientID [portal]"),
        ("POST", "/api/links"),
        ("GET", "/link/{secret}"),
        ("GET", "/studies/{s}/metadata [link]"),
        ("GET", "/api/links"),
    ],
    "Harvester": [("GET", "/studies?StudyDate [sync]"), ("GET", "/studies [sync, full]")],
}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.network
@pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed (pip install -e '.[bench]')",
)
def test_every_profile_runs_without_failures(tmp_path: Path) -> None:
    # Open access: tokens from the caller's environment would only make this run differ from CI's.
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_TOKEN", "GATEWAY_PATIENT_TOKEN")}
    stats = tmp_path / "stats"
    with running_gateway(folder_source("fixtures", FIXTURES), tmp_path / "gateway") as url:
        result = subprocess.run(
            [
                sys.executable, "-m", "locust", "-f", "bench/locustfile.py", "--headless",
                "-u", "6", "-r", "6", "-t", "8s", "--host", url.removesuffix("/dicom-web"),
                "--only-summary", "--csv", str(stats),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    output = result.stdout[-3000:] + result.stderr[-3000:]
    made = {
        (row["Type"], row["Name"]): int(row["Request Count"]) for row in _rows(Path(f"{stats}_stats.csv"))
    }
    missing = {
        profile: [name for name in names if not made.get(name)] for profile, names in MAIN_REQUESTS.items()
    }
    assert {profile: names for profile, names in missing.items() if names} == {}, output
    assert _rows(Path(f"{stats}_failures.csv")) == [], output
    # A Python error in a task is no request failure, but it cuts the profile short.
    assert _rows(Path(f"{stats}_exceptions.csv")) == [], output
    assert result.returncode == 0, output
