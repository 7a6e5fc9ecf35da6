"""The gateway itself as a peer: ``gateway serve`` in a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from peers.process import PeerError, free_port, stop

ROOT = Path(__file__).resolve().parent.parent
OPEN = "[auth]\nopen = true\n"  # tests of DICOMweb behaviour; access control has its own tests

__all__ = ["running_gateway", "folder_source", "dicomweb_source", "dimse_source"]


def folder_source(name: str, folder: Path, priority: int = 0) -> str:
    return f'[[sources]]\nname = "{name}"\nkind = "filesystem"\npath = "{folder}"\npriority = {priority}\n'


def dicomweb_source(name: str, url: str, priority: int = 0, timeout: float = 5.0) -> str:
    return (
        f'[[sources]]\nname = "{name}"\nkind = "dicomweb"\nurl = "{url}"\npriority = {priority}\n'
        f"connect_timeout = 2\ntimeout = {timeout}\ntotal_timeout = 30\n"
    )


def dimse_source(
    name: str,
    port: int,
    called_ae: str,
    priority: int = 0,
    retrieve: str = "c-get",
    move_port: int | None = None,
    timeout: float = 5.0,
) -> str:
    move = f"move_destination_port = {move_port}\n" if move_port else ""
    return (
        f'[[sources]]\nname = "{name}"\nkind = "dimse"\nhost = "127.0.0.1"\nport = {port}\n'
        f'called_ae = "{called_ae}"\ncalling_ae = "GATEWAY"\nretrieve = "{retrieve}"\n{move}'
        f"priority = {priority}\nconnect_timeout = 2\ntimeout = {timeout}\ntotal_timeout = 30\n"
    )


@contextlib.contextmanager
def running_gateway(
    sources: str,
    work: Path,
    wait_for_studies: bool = True,
    auth: str | None = None,
    headers: dict[str, str] | None = None,
    registry_url: str | None = None,
    server: str = "",
) -> Iterator[str]:
    """``gateway serve`` as a subprocess with the given ``[[sources]]`` tables and ``[auth]``
    section (default: open, on loopback; ``headers`` then carry the credentials that the start-up
    check's QIDO needs; ``registry_url`` another registry than a SQLite file in ``work``, e.g.
    one PostgreSQL database for several nodes; ``server`` more ``[server]`` keys); yields the
    DICOMweb base URL once it answers (and, by default, once its first harvest found studies)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = work / "gateway.toml"
    registry = registry_url or f"sqlite:///{work / 'registry.db'}"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n{server}'
        f'[registry]\nurl = "{registry}"\ndata_dir = "{work}"\n' + (auth or OPEN) + sources
    )
    log = work / "gateway.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/dicom-web"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"{url}/studies", timeout=2, headers=headers)
                if response.status_code == 200 and (response.json() or not wait_for_studies):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise PeerError("gateway did not start:\n" + log.read_text())
            time.sleep(0.2)
        yield url
    finally:
        stop(process)
