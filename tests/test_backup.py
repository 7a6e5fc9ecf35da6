"""``gateway backup``: consistent copies while a real gateway serves and writes its audit, and a
restore from them; PostgreSQL through pg_dump."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway.access.store import AccessStore
from gateway.backup import backup
from gateway.config import load_config
from peers.gateway import ROOT, folder_source, running_gateway
from tests.backends import databases, postgres_problem, postgres_required
from tests.conftest import FIXTURES

pytestmark = pytest.mark.network


def rows(path: Path, table: str = "audit") -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_a_backup_taken_while_serving_holds_every_committed_record_and_restores(tmp_path):
    work = tmp_path / "gateway"
    with running_gateway(folder_source("fixtures", FIXTURES), work) as url:
        stop = threading.Event()

        def load() -> None:  # a viewer's traffic: every request is an audit record
            with httpx.Client(timeout=10) as http:
                while not stop.is_set():
                    http.get(f"{url}/studies")

        threads = [threading.Thread(target=load) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            committed = rows(work / "access.db")  # what is committed now, in the WAL or not
            assert committed > 0
            done = subprocess.run(
                [sys.executable, "-m", "gateway", "backup", "--config", str(work / "gateway.toml"),
                 str(tmp_path / "saved")],
                cwd=ROOT, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    saved = tmp_path / "saved" / "access.db"
    assert rows(saved) >= committed  # nothing committed before the backup is missing
    assert rows(saved) <= rows(work / "access.db")
    assert not list((tmp_path / "saved").glob("*-wal"))  # self-contained files
    # Restore: the copies in place of the originals; the gateway's own store opens them.
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(saved, restored / "access.db")
    store = AccessStore(f"sqlite:///{restored / 'access.db'}")
    try:
        assert store.audit_count() == rows(saved)
        assert store.audit(limit=1)[0].action == "query"
    finally:
        store.close()
    assert rows(tmp_path / "saved" / "registry.db", "instances") == rows(work / "registry.db", "instances")


def test_a_postgresql_registry_is_dumped_once_with_pg_dump(tmp_path):
    problem = postgres_problem()
    if problem and postgres_required():
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)
    for found in databases("postgresql"):
        url = found.url(tmp_path / "unused.db")
        store = AccessStore(url)  # the access tables, with a grant in them
        store.add_grant("INS-1", "pro:issuer|10001", None)
        store.close()
        (tmp_path / "gateway.toml").write_text(f'[registry]\nurl = "{url}"\n[auth]\nopen = true\n')
        made = backup(load_config(tmp_path / "gateway.toml", env={}), tmp_path / "saved")
        # The access tables live in the registry's database: one dump holds both.
        assert [path.name for path in made] == ["access.dump"]
        listing = subprocess.run(["pg_restore", "--list", str(made[0])], capture_output=True, text=True)
        assert listing.returncode == 0, listing.stderr
        schema = found.schemas[0]
        assert f"TABLE DATA {schema} grants" in listing.stdout
        assert f"TABLE DATA {schema} audit" in listing.stdout
