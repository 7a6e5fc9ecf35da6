"""DCMTK's ``dcmqrscp`` (Debian package ``dcmtk``) as a second DIMSE PACS: C-FIND, C-GET and
C-MOVE over a private storage area whose files are registered with ``dcmqridx``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE

from peers.process import PeerError, free_port, stop

__all__ = ["Dcmqrscp", "dcmtk_missing", "running_dcmqrscp"]


@dataclass(frozen=True)
class Dcmqrscp:
    port: int
    aet: str
    process: subprocess.Popen
    log: Path
    storage: Path
    move_destinations: dict[str, int]


def dcmtk_missing() -> str | None:
    for tool in ("dcmqrscp", "dcmqridx"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian package dcmtk)"
    return None


@contextlib.contextmanager
def running_dcmqrscp(
    workdir: Path, files: list[Path], aet: str = "DCMQRSCP", move_destinations: dict[str, int] | None = None
) -> Iterator[Dcmqrscp]:
    """dcmqrscp holding copies of ``files``; ``move_destinations`` maps AE titles to loopback ports
    it may C-MOVE to (its HostTable)."""
    missing = dcmtk_missing()
    if missing:
        raise PeerError(missing)
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    copies = []
    for index, path in enumerate(files):
        copy = storage / f"{index:05d}.dcm"
        shutil.copy(path, copy)
        copies.append(str(copy))
    subprocess.run(["dcmqridx", str(storage), *copies], check=True, capture_output=True, timeout=120)
    port = free_port()
    hosts = "".join(
        f"{title.lower()} = ({title}, 127.0.0.1, {number})\n"
        for title, number in (move_destinations or {}).items()
    )
    config = workdir / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        f"HostTable BEGIN\n{hosts}HostTable END\n"
        "VendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\n{aet} {storage} RW (1000, 1024mb) ANY\nAETable END\n"
    )
    log = workdir / "dcmqrscp.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["dcmqrscp", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # dcmqrscp forks a child per association: stop them all
        )
    try:
        _wait_echo(port, aet, process, log)
        yield Dcmqrscp(port, aet, process, log, storage, dict(move_destinations or {}))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        stop(process)


def _wait_echo(port: int, aet: str, process: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerError(f"dcmqrscp exited with code {process.returncode}:\n{log.read_text()}")
        try:  # listening yet? (pynetdicom would leave a socket behind on a refused connection)
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.1)
            continue
        assoc = ae.associate("127.0.0.1", port, ae_title=aet)
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.2)
    raise PeerError(f"dcmqrscp did not answer C-ECHO within {timeout:.0f} s:\n{log.read_text()}")
