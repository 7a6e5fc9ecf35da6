"""The DIMSE association pool against a real PACS (DCMTK's dcmqrscp on loopback): reuse, parking,
retiring idle associations, and replacing one the PACS dropped while it was idle."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import Deadlines, SourceConfig
from gateway.stream.dimse import associations
from gateway.stream.dimse.associations import QUERIES, AssociationPool
from peers.dcmtk import Dcmqrscp, dcmtk_missing, running_dcmqrscp
from tests.conftest import fixture_files

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(dcmtk_missing() is not None, reason=str(dcmtk_missing())),
]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dcmqrscp]:
    with running_dcmqrscp(tmp_path_factory.mktemp("dcmqrscp"), fixture_files()[:1]) as peer:
        yield peer


@pytest.fixture
def pool(pacs: Dcmqrscp) -> Iterator[AssociationPool]:
    config = SourceConfig(
        name="pacs",
        kind="dimse",
        host="127.0.0.1",
        port=pacs.port,
        called_ae=pacs.aet,
        calling_ae="GATEWAY",
        deadlines=Deadlines(connect=2, message=5, total=30),
    )
    pool = AssociationPool("pacs", config)
    yield pool
    pool.close()


def echo(pool: AssociationPool) -> tuple[object, int]:
    with pool.acquire(QUERIES) as assoc:
        status = assoc.send_c_echo()
        return assoc, int(status.Status)


def test_a_pooled_association_is_reused_and_answers_after_idling(pool):
    first, status = echo(pool)
    assert status == 0 and pool.idle_count() == 1
    time.sleep(0.2)  # parked: its reactor paused, its socket polled slowly
    second, status = echo(pool)
    assert second is first and status == 0


def test_idle_associations_are_retired_without_any_request(pool, monkeypatch):
    monkeypatch.setattr(associations, "_IDLE", 0.3)
    assoc, _ = echo(pool)
    assert pool.idle_count() == 1
    deadline = time.monotonic() + 5
    while (pool.idle_count() or assoc.is_established) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.idle_count() == 0
    assert assoc.is_released  # released, not merely forgotten


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def test_an_association_the_pacs_dropped_while_idle_is_replaced(pool, pacs):
    first, _ = echo(pool)
    # dcmqrscp serves each association in a forked child: killing it drops the connection.
    for child in _children(pacs.process.pid):
        os.kill(child, signal.SIGKILL)
    time.sleep(0.3)  # the parked association's reader sees the connection close
    second, status = echo(pool)
    assert second is not first and status == 0
