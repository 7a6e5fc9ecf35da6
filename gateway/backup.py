"""Online backups of what the gateway keeps: the access database (grants, links, sessions, the
audit: none of it can be rebuilt) and the registry (rebuilt by harvest, but that takes time).

A plain copy of a SQLite file while the gateway serves is not a backup: recent commits live in the
write-ahead log beside it, and a copy made during a checkpoint is torn (tried: ``cp access.db``
while serving kept 1,556 of 2,493 audit rows). SQLite's online backup API copies a consistent
snapshot, WAL included, while writers go on (in WAL mode a reader does not block them); it is
taken in one step, since a stepped backup restarts whenever another connection writes, and the
audit writes every 0.2 s. PostgreSQL is dumped by its own ``pg_dump`` (a consistent snapshot in one
transaction). Restoring: see README, "Backups".
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from gateway import dburl
from gateway.config import Config
from gateway.errors import GatewayError

__all__ = ["backup"]

_PG_DUMP_SECONDS = 3600


def backup(config: Config, target: Path) -> list[Path]:
    """Consistent copies of the access database and the registry into ``target``; the files made."""
    target.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    dumped: set[str] = set()  # the registry's PostgreSQL database holds the access tables by default
    for name, url in (("access", config.access_database), ("registry", config.registry_url)):
        if (path := dburl.sqlite_path(url)) is not None:
            made.append(_sqlite(path, target / f"{name}.db"))
        elif url not in dumped:
            dumped.add(url)
            made.append(_postgresql(url, target / f"{name}.dump"))
    return made


def _sqlite(source: Path, destination: Path) -> Path:
    if not source.exists():
        raise GatewayError(f"backup: {source} does not exist")
    partial = destination.with_name(destination.name + ".partial")
    partial.unlink(missing_ok=True)
    src = dst = None
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        dst = sqlite3.connect(partial)
        src.backup(dst)  # one step: a snapshot (see the module docstring)
        # One self-contained file (the copy would otherwise keep the source's WAL mode).
        dst.execute("PRAGMA journal_mode=DELETE")
        if dst.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise GatewayError(f"backup: the copy of {source} fails SQLite's integrity check")
    except sqlite3.Error as exc:
        raise GatewayError(f"backup: cannot copy {source}: {exc}") from exc
    finally:
        for conn in (dst, src):
            if conn is not None:
                conn.close()
    partial.replace(destination)  # whole or not at all
    return destination


def _postgresql(url: str, destination: Path) -> Path:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise GatewayError("backup: pg_dump is needed for a PostgreSQL database (Debian: postgresql-client)")
    partial = destination.with_name(destination.name + ".partial")
    try:
        done = subprocess.run(
            [pg_dump, "--format=custom", "--no-owner", f"--file={partial}", f"--dbname={url}"],
            capture_output=True,
            text=True,
            timeout=_PG_DUMP_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        raise GatewayError(f"backup: pg_dump of {_where(url)} took longer than {_PG_DUMP_SECONDS} s") from exc
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise GatewayError(
            f"backup: pg_dump of {_where(url)} failed: {lines[-1] if lines else done.returncode}"
        )
    partial.replace(destination)
    return destination


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"  # no user, no password
