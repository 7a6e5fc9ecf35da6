"""The registry's two backends for tests: SQLite files, and PostgreSQL schemas.

PostgreSQL is found at ``GATEWAY_TEST_POSTGRESQL`` (a URL; ``.ci/run`` sets it, and then a server
that does not answer is a failure) or, without it, at postgresql://postgres@127.0.0.1:5432/test
(then a server that does not answer skips those tests, saying so). Each registry gets a schema of
its own, dropped at the end of the session.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

__all__ = ["BACKENDS", "Databases", "databases", "postgres_problem", "postgres_required", "postgres_url"]

BACKENDS = ["sqlite", "postgresql"]
_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_url() -> str:
    return os.environ.get("GATEWAY_TEST_POSTGRESQL") or _DEFAULT


def postgres_required() -> bool:
    return bool(os.environ.get("GATEWAY_TEST_POSTGRESQL"))


def postgres_problem() -> str | None:
    """None when PostgreSQL answers at ``postgres_url()``, else why not."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    try:
        with psycopg.connect(postgres_url(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {postgres_url()}: {str(exc).strip().splitlines()[0]}"
    return None


class Databases:
    """Fresh, isolated registry URLs for one backend."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.schemas: list[str] = []

    def url(self, path: Path) -> str:
        """A registry URL of its own: the SQLite file ``path``, or a new PostgreSQL schema."""
        if self.backend == "sqlite":
            return f"sqlite:///{path}"
        import psycopg

        schema = f"gw_test_{secrets.token_hex(6)}"
        with psycopg.connect(postgres_url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        self.schemas.append(schema)
        separator = "&" if "?" in postgres_url() else "?"
        return f"{postgres_url()}{separator}options={quote(f'-csearch_path={schema}')}"

    def drop(self) -> None:
        if not self.schemas:
            return
        import psycopg

        with psycopg.connect(postgres_url(), autocommit=True) as conn:
            for schema in self.schemas:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        self.schemas.clear()


def databases(backend: str) -> Iterator[Databases]:
    found = Databases(backend)
    try:
        yield found
    finally:
        found.drop()
