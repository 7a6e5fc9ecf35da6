"""Orthanc with its DICOMweb plugin (Debian packages ``orthanc``, ``orthanc-dicomweb``) as a PACS:
private storage, loopback only, HTTP compression off; loaded with files over its REST API."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from peers.process import PeerError, free_port, stop, wait_http

__all__ = ["Orthanc", "orthanc_missing", "running_orthanc", "ORTHANC_BIN", "ORTHANC_DICOMWEB"]

ORTHANC_BIN = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass(frozen=True)
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, paths: list[Path], threads: int = 4) -> None:
        """POST every file to /instances; any refusal is an error."""
        with httpx.Client(base_url=self.url, timeout=60) as http:

            def one(path: Path) -> None:
                response = http.post(
                    "/instances", content=path.read_bytes(), headers={"Content-Type": "application/dicom"}
                )
                if response.status_code != 200 or response.json().get("Status") not in (
                    "Success",
                    "AlreadyStored",
                ):
                    raise PeerError(
                        f"Orthanc refused {path.name}: {response.status_code} {response.text[:200]}"
                    )

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, paths))


def orthanc_missing() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    for path in (ORTHANC_BIN, ORTHANC_DICOMWEB):
        if not Path(path).is_file():
            return f"{path} not found (Debian packages orthanc, orthanc-dicomweb)"
    return None


@contextlib.contextmanager
def running_orthanc(
    workdir: Path, aet: str = "ORTHANC", modalities: dict[str, list] | None = None
) -> Iterator[Orthanc]:
    """A private Orthanc; ``modalities`` are the DICOM peers it may C-MOVE to (AET: [aet, host, port])."""
    missing = orthanc_missing()
    if missing:
        raise PeerError(missing)
    home = Path(tempfile.mkdtemp(prefix="orthanc-", dir=workdir))
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "peer",
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "Plugins": [ORTHANC_DICOMWEB],
        "HttpCompressionEnabled": False,  # raw transfer, as a fair peer and for byte comparisons
        "AuthenticationEnabled": False,
        "RemoteAccessAllowed": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": modalities or {},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (home / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = home / "orthanc.log"
    try:
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [ORTHANC_BIN, str(home / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT, cwd=home
            )
        try:
            wait_http(f"http://127.0.0.1:{http_port}/system", process, "Orthanc", str(log))
            yield Orthanc(http_port, dicom_port, aet, process, log)
        finally:
            stop(process)
    finally:
        shutil.rmtree(home, ignore_errors=True)
