"""Starting and stopping the servers under test: the gateway (`gateway serve` on a config this
module writes) and a private Orthanc with its DICOMweb plugin; free ports, readiness, server logs."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, BenchError, Http

ORTHANC_BIN = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

SOURCE_NAME = "bench"  # the gateway config's source; `gateway index` records its run under it


def free_port() -> int:
    # Bind to port 0 so the kernel picks a free port; it is released just before the server binds
    # it (a tiny race, acceptable on a benchmark machine).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(port: int, path: str, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    """Until `path` answers 200; fails early if the server process has already exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} before answering {path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer {path} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop one process we started: SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


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


@dataclass
class Server:
    """A running server under test."""

    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


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
        wait_http(port, "/health", proc, "gateway serve")
        yield Server("gateway", port, proc, log_path)
    finally:
        stop(proc)


def orthanc_available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else why not."""
    if not Path(ORTHANC_BIN).is_file():
        return f"{ORTHANC_BIN} not found"
    if not Path(ORTHANC_DICOMWEB).is_file():
        return f"{ORTHANC_DICOMWEB} not found"
    return None


@contextlib.contextmanager
def orthanc_server(workdir: Path, logs: Path) -> Iterator[Server]:
    """A private Orthanc: storage and index in a temp dir (deleted after), loopback only."""
    home = Path(tempfile.mkdtemp(prefix="orthanc-", dir=workdir))
    port = free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "index"),
        "HttpPort": port,
        "DicomPort": free_port(),
        "Plugins": [ORTHANC_DICOMWEB],
        "HttpCompressionEnabled": False,  # we compare raw transfer, not gzip
        "AuthenticationEnabled": False,
        "RemoteAccessAllowed": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = home / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=1))
    log_path = logs / "orthanc.log"
    try:
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [ORTHANC_BIN, str(config_path)], stdout=log_file, stderr=subprocess.STDOUT, cwd=home
            )
        try:
            wait_http(port, "/system", proc, "Orthanc")
            yield Server("orthanc", port, proc, log_path)
        finally:
            stop(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def orthanc_upload(server: Server, paths: list[Path], threads: int = 4) -> float:
    """POST every file to /instances (raw body) from a small thread pool; returns seconds."""
    local = threading.local()

    def upload(path: Path) -> None:
        if not hasattr(local, "http"):
            local.http = Http(server.port)
        response = local.http.request(
            "POST", "/instances", {"Content-Type": "application/dicom"}, path.read_bytes()
        )
        body = response.read()
        if response.status != 200 or json.loads(body).get("Status") not in ("Success", "AlreadyStored"):
            raise BenchError(f"Orthanc refused {path.name}: {response.status} {body[:200]!r}")

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(upload, paths))
    return time.perf_counter() - start
