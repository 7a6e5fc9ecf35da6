"""The servers under test, as the measurements see them (`Server`): the gateway (`gateway serve
--no-harvest` on a config and pre-indexed registry this module writes) and a private Orthanc
with its DICOMweb plugin (`peers.orthanc`), loaded with the study; server logs.

Ports, readiness, stopping and Orthanc itself come from `peers/`, shared with the tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, BenchError
from peers.orthanc import ORTHANC_BIN, orthanc_missing, running_orthanc
from peers.process import free_port, stop, wait_http

__all__ = [
    "ORTHANC_BIN",
    "DIMSE_CALLERS",
    "SOURCE_NAME",
    "Server",
    "fresh_registry",
    "gateway_server",
    "log_problems",
    "orthanc_available",
    "orthanc_server",
    "write_gateway_config",
]

SOURCE_NAME = "bench"  # the gateway config's source; `gateway index` records its run under it
# The calling AE titles Orthanc must know: Orthanc 1.10 refuses C-FIND and C-GET from AEs missing
# from its DicomModalities (DicomCheckCalledAet false only relaxes the *called* AET). The gateway
# calls as GATEWAY (peers.gateway.dimse_source), getscu as GETSCU. The port would only matter for
# C-MOVE (C-GET answers on the caller's own association): a placeholder.
DIMSE_CALLERS = {aet: [aet, "127.0.0.1", 104] for aet in ("GATEWAY", "GETSCU")}


@dataclass
class Server:
    """A running server under test. `proc` is None when the server was started by code that does
    not hand out its process (`peers.gateway.running_gateway`)."""

    name: str
    port: int
    proc: subprocess.Popen | None
    log_path: Path
    dimse: tuple[int, str] | None = None  # Orthanc's DICOM port and AE title

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root: /dicom-web on both the gateway and the bench's Orthanc."""
        return f"http://127.0.0.1:{self.port}/dicom-web"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name}: process not known")
        return self.proc.pid


def log_problems(path: Path) -> list[str]:
    """ERROR lines and tracebacks a server wrote: gateway problems worth reporting."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [
        line
        for line in lines
        if " ERROR " in line or line.startswith("Traceback") or line.startswith("ERROR:")
    ]


def write_gateway_config(path: Path, registry: Path, study_dir: Path, port: int = 8123) -> Path:
    """A gateway config: one filesystem source (the study) and a SQLite registry."""
    path.write_text(
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        "[registry]\n"
        f'url = "sqlite:///{registry}"\n'
        "[auth]\nopen = true\n"
        "[[sources]]\n"
        f'name = "{SOURCE_NAME}"\n'
        'kind = "filesystem"\n'
        f'path = "{study_dir}"\n',
        encoding="utf-8",
    )
    return path


def fresh_registry(registry: Path) -> None:
    """Delete the SQLite registry and its side files, so the next index starts from nothing."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(registry) + suffix).unlink(missing_ok=True)


@contextlib.contextmanager
def gateway_server(config: Path, logs: Path, tag: str) -> Iterator[Server]:
    """`gateway serve` without harvesting (the registry is already indexed); log in logs/, by tag."""
    port = free_port()
    log_path = logs / f"gateway-serve-{tag}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-harvest",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, "gateway serve", str(log_path))
        yield Server("gateway", port, proc, log_path)
    finally:
        stop(proc)


def orthanc_available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else why not."""
    return orthanc_missing()


@contextlib.contextmanager
def orthanc_server(workdir: Path, logs: Path, paths: list[Path]) -> Iterator[tuple[Server, float]]:
    """A private Orthanc (`peers.orthanc`: storage in a temp dir under workdir, deleted after),
    loaded with `paths`; yields it with the upload's seconds. Its log is copied to logs/. It
    accepts C-FIND/C-GET from the gateway and getscu (`DIMSE_CALLERS`)."""
    with running_orthanc(workdir, aet="BENCH", modalities=DIMSE_CALLERS) as orthanc:
        try:
            start = time.perf_counter()
            orthanc.upload(paths)
            upload_s = time.perf_counter() - start
            dimse = (orthanc.dicom_port, orthanc.aet)
            yield Server("orthanc", orthanc.http_port, orthanc.process, orthanc.log, dimse), upload_s
        finally:
            # The log lives in Orthanc's temp dir, which is deleted when it stops: keep a copy.
            with contextlib.suppress(OSError):
                shutil.copyfile(orthanc.log, logs / "orthanc.log")
