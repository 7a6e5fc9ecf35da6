"""The registry's database: SQLite (embedded default) or PostgreSQL (several nodes), behind one
small interface, so that the registry's SQL is written once.

The SQL the registry writes is the common subset of both: ``?`` placeholders, ``ON CONFLICT``
upserts, ``RETURNING``. What differs is said here once: column types, the wildcard operator
(SQLite ``GLOB`` with ``*``/``?``; PostgreSQL ``LIKE`` with ``%``/``_``), string aggregation,
how the schema version is kept, and how a reader learns that another connection committed (SQLite
``PRAGMA data_version``; PostgreSQL a generation counter bumped by every write transaction).

PostgreSQL folds unquoted names to lower case; rows give columns back under their DICOM keyword
spelling (``StudyInstanceUID``), as SQLite does, so callers never see the difference. psycopg is
imported only when a PostgreSQL URL is configured.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from gateway import dburl
from gateway.errors import RegistryError

__all__ = ["IN_LIST", "in_chunks", "Database", "Row", "open_database", "SQLiteDatabase", "PostgresDatabase"]


class Row(Protocol):
    """A result row: by position or by column name (``row[0]``, ``row["PatientID"]``, ``keys()``)."""

    def __getitem__(self, key: int | str) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...
    def keys(self) -> list[str]: ...


class Database(Protocol):
    dialect: str  # "sqlite" | "postgresql"
    where: str  # for messages: the file or the server

    def transaction(self) -> Any: ...  # context manager yielding a connection-like ``execute``
    # A transaction whose commit does not move the location cache's generation: for writes that
    # change no location (the change feed's pruning).
    def transaction_without_generation(self) -> Any: ...
    def query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]: ...
    def change_token(self) -> Any: ...
    def schema_version(self) -> int: ...
    def create_schema(self, statements: list[str], version: int) -> None: ...
    def migrate(self, migrations: list[list[str]]) -> int: ...
    def exclusive(self, name: str) -> Any: ...  # context manager yielding True if this holder has it
    def analyze(self, tables: Iterable[str], vacuum: bool = True) -> None: ...
    def estimated_rows(self, tables: Sequence[str]) -> dict[str, float]: ...
    def drop(self, tables: Iterable[str]) -> list[str]: ...
    def close(self) -> None: ...


def open_database(
    url: str, canonical: Iterable[str] = (), meta: str = "registry_meta"
) -> SQLiteDatabase | PostgresDatabase:
    """``sqlite:///PATH`` or ``postgresql://...``; ``canonical``: column names to give back in
    their own spelling (PostgreSQL lower-cases them); ``meta``: the table keeping the schema
    version on PostgreSQL, where the registry and the access tables may share one database (a
    SQLite file holds one of them and keeps its version in ``PRAGMA user_version``)."""
    if (path := dburl.sqlite_path(url)) is not None:
        return SQLiteDatabase(path)
    if dburl.is_postgresql(url):
        return PostgresDatabase(url, canonical, meta)
    raise RegistryError(f"registry url: {dburl.check(url)}")


IN_LIST = 500  # values in one IN (...): far below SQLite's (32,766) and PostgreSQL's (65,535) limits


def in_chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """``values`` in slices of at most ``IN_LIST``, one ``IN (...)`` each."""
    for start in range(0, len(values), IN_LIST):
        yield values[start : start + IN_LIST]


# -- SQLite ------------------------------------------------------------------------------------


class SQLiteDatabase:
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._generation = 0

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise RegistryError(f"cannot open registry {self.path}: {exc}") from exc
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
            self._generation += 1  # data_version does not see this connection's own commits
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise RegistryError(f"registry write failed: {exc}") from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def transaction_without_generation(self) -> Any:
        # SQLite's generation is the file's data_version, which every commit moves anyway.
        return self.transaction()

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        try:
            return self._conn().execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise RegistryError(f"registry query failed: {exc}") from exc

    def change_token(self) -> Any:
        """Changes when any connection (this process's harvest, another process) has committed."""
        return (self._conn().execute("PRAGMA data_version").fetchone()[0], self._generation)

    def schema_version(self) -> int:
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    def analyze(self, tables: Iterable[str], vacuum: bool = True) -> None:
        """Refresh the planner's statistics after a bulk change (SQLite keeps none until asked:
        without them it chose the wrong index for ModalitiesInStudy at 1,000,000 instances).
        Sampled (``analysis_limit``): a second or so, whatever the registry's size. SQLite's
        planner needs no visibility map: ``vacuum`` changes nothing here."""
        conn = self._conn()
        conn.execute("PRAGMA analysis_limit = 1000")
        for table in tables:
            conn.execute(f"ANALYZE {table}")

    def estimated_rows(self, tables: Sequence[str]) -> dict[str, float]:
        """Rows per table as the last ``analyze`` counted them (0: not analyzed yet)."""
        out = dict.fromkeys(tables, 0.0)
        try:
            rows = self._conn().execute("SELECT tbl, stat FROM sqlite_stat1").fetchall()
        except sqlite3.Error:  # no sqlite_stat1 before the first ANALYZE
            return out
        for table, stat in rows:
            if table in out and stat:
                out[table] = max(out[table], float(str(stat).split()[0]))  # its first number
        return out

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """True for one holder at a time across processes sharing this file (a lock file
        beside it), False at once for the others."""
        import fcntl

        lock = self.path.with_name(f"{self.path.name}.{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock")
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def create_schema(self, statements: list[str], version: int) -> None:
        conn = self._conn()
        conn.executescript(";\n".join(statements) + ";")
        conn.execute(f"PRAGMA user_version = {int(version)}")

    def migrate(self, migrations: list[list[str]]) -> int:
        """Apply the migrations after the recorded version, each in one transaction."""
        version = self.schema_version()
        for number, statements in enumerate(migrations[version:], start=version + 1):
            with self.transaction() as conn:
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
        return len(migrations)

    def drop(self, tables: Iterable[str]) -> list[str]:
        """Drop those of ``tables`` that exist; returns them."""
        conn = self._conn()
        existing = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        dropped = [table for table in tables if table in existing]
        for table in dropped:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        return dropped

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


# -- PostgreSQL --------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\?")


class _PgRow(tuple):  # type: ignore[type-arg]
    """A tuple that answers by column name too, like sqlite3.Row."""

    __slots__ = ()
    _index: dict[str, int]
    _names: list[str]

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return self._names


def _row_class(names: Sequence[str]) -> type[_PgRow]:
    index: dict[str, int] = {}
    for position, name in enumerate(names):
        index.setdefault(name, position)  # a duplicate name (st.*, se.*): the first, as in SQLite
    return type("Row", (_PgRow,), {"_index": index, "_names": list(names), "__slots__": ()})


class _PgConnection:
    """What the registry's write code calls on a connection: ``execute(sql, params)`` and
    ``executemany(sql, rows)``, as on a sqlite3 connection."""

    def __init__(self, conn: Any, database: PostgresDatabase) -> None:
        self._conn = conn
        self._database = database

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._database._execute(self._conn, sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        # psycopg sends the rows in pipeline mode: one round trip for the batch, not one per row
        # (the synthetic registry of bench/scale.py: ~950 instances/s row by row, ~5,000/s so).
        try:
            with self._conn.cursor() as cursor:
                cursor.executemany(_PLACEHOLDER.sub("%s", sql), [_text_safe(row) for row in rows])
        except self._database._psycopg.Error as exc:
            raise RegistryError(f"registry write failed: {exc}") from exc


class _PgCursor:
    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, url: str, canonical: Iterable[str] = (), meta: str = "registry_meta") -> None:
        self.meta = meta
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise RegistryError(
                f"registry {_redact(url)}: PostgreSQL needs psycopg and psycopg-pool ({exc})"
            ) from exc
        self._psycopg = psycopg
        self.where = _redact(url)
        self._canonical = {name.lower(): name for name in canonical}
        self._rows: dict[tuple[str, ...], type[_PgRow]] = {}
        try:
            # Connections are borrowed per query or transaction: a node's worker threads share a
            # few, and many nodes fit in PostgreSQL's max_connections.
            self._pool = ConnectionPool(
                url,
                min_size=1,
                max_size=8,
                timeout=30,
                kwargs={"autocommit": True},
                configure=_configure,
                open=False,
            )
            self._pool.open(wait=True, timeout=10)
        except (psycopg.Error, Exception) as exc:
            raise RegistryError(f"cannot connect to registry {self.where}: {exc}") from exc

    def _execute(self, conn: Any, sql: str, params: Sequence[Any]) -> _PgCursor:
        try:
            cursor = conn.execute(_PLACEHOLDER.sub("%s", sql), _text_safe(params), prepare=False)
            rows: list[Any] = []
            if cursor.description is not None:
                names = tuple(self._canonical.get(column.name, column.name) for column in cursor.description)
                row_class = self._rows.get(names)
                if row_class is None:
                    row_class = self._rows[names] = _row_class(names)
                rows = [row_class(values) for values in cursor.fetchall()]
            return _PgCursor(rows, cursor.rowcount)
        except self._psycopg.Error as exc:
            raise RegistryError(f"registry query failed: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[_PgConnection]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                wrapped = _PgConnection(conn, self)
                yield wrapped
                # Readers on every node notice the commit (see change_token).
                wrapped.execute(f"UPDATE {self.meta} SET generation = generation + 1")
        except self._psycopg.Error as exc:
            raise RegistryError(f"registry write failed: {exc}") from exc

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        try:
            with self._pool.connection() as conn:
                return self._execute(conn, sql, tuple(params)).fetchall()
        except self._psycopg.Error as exc:
            raise RegistryError(f"registry query failed: {exc}") from exc

    def change_token(self) -> Any:
        rows = self.query(f"SELECT generation FROM {self.meta}")
        return rows[0][0] if rows else None

    def schema_version(self) -> int:
        rows = self.query(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_name = ?",
            (self.meta,),
        )
        if not rows:
            return 0
        found = self.query(f"SELECT version FROM {self.meta}")
        return int(found[0][0]) if found else 0

    def create_schema(self, statements: list[str], version: int) -> None:
        with self.transaction_without_generation() as conn:
            # One node creates the schema at a time (nodes starting together).
            conn.execute("SELECT pg_advisory_xact_lock(7267)")
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"CREATE TABLE IF NOT EXISTS {self.meta} (version INTEGER, generation BIGINT)")
            conn.execute(f"DELETE FROM {self.meta}")
            conn.execute(f"INSERT INTO {self.meta} VALUES (?, 0)", (int(version),))

    def migrate(self, migrations: list[list[str]]) -> int:
        """Apply the migrations after the recorded version, each in one transaction, one node
        at a time."""
        with self.transaction_without_generation() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(7268)")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {self.meta} (version INTEGER, generation BIGINT)")
            found = conn.execute(f"SELECT version FROM {self.meta}").fetchone()
            if found is None:
                conn.execute(f"INSERT INTO {self.meta} VALUES (0, 0)")
            version = int(found[0]) if found else 0
            for number, statements in enumerate(migrations[version:], start=version + 1):
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"UPDATE {self.meta} SET version = ?", (number,))
        return len(migrations)

    @contextmanager
    def transaction_without_generation(self) -> Iterator[_PgConnection]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield _PgConnection(conn, self)
        except self._psycopg.Error as exc:
            raise RegistryError(f"registry write failed: {exc}") from exc

    def analyze(self, tables: Iterable[str], vacuum: bool = True) -> None:
        """Refresh the planner's statistics after a bulk change (autovacuum gets there later, if
        it runs at all; until then a freshly harvested registry was planned as if empty: seconds
        per QIDO), and with ``vacuum`` the visibility map, without which an index-only scan
        still reads the table (a page of 1,000 studies by ModalitiesInStudy: 66 -> 41 ms at
        1,000,000 instances). Neither takes a lock that stops readers or writers; VACUUM took
        3 s at that size, ANALYZE alone samples and takes well under one. On a pool connection
        of its own, in autocommit mode (VACUUM cannot run in a transaction)."""
        statement = "VACUUM (ANALYZE)" if vacuum else "ANALYZE"
        with self._pool.connection() as conn:
            for table in tables:
                conn.execute(f"{statement} {table}")

    def estimated_rows(self, tables: Sequence[str]) -> dict[str, float]:
        """Rows per table as the last ANALYZE estimated them (0: not analyzed yet)."""
        out = dict.fromkeys(tables, 0.0)
        names = {table.lower(): table for table in tables}  # PostgreSQL's folded spelling
        for name, count in self.query(
            "SELECT c.relname, c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relname = ANY(?)",
            (list(names),),
        ):
            out[names[name]] = max(0.0, float(count))  # -1: never analyzed
        return out

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """True for one holder at a time across every node (a session-level advisory lock on a
        connection kept for the duration), False at once for the others. Advisory locks are
        per database: the key names the schema too, so gateways in schemas of their own on one
        database (tests do this) do not skip each other's harvests."""
        try:
            with self._pool.connection() as conn:
                schema = conn.execute("SELECT current_schema()").fetchone()
                scoped = f"{schema[0] if schema else ''}:{name}"
                key = int.from_bytes(hashlib.sha256(scoped.encode()).digest()[:8], "big", signed=True)
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                held = bool(row and row[0])
                try:
                    yield bool(held)
                finally:
                    if held:
                        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except self._psycopg.Error as exc:
            raise RegistryError(f"registry lock {name!r} failed: {exc}") from exc

    def drop(self, tables: Iterable[str]) -> list[str]:
        """Drop those of ``tables`` that exist (only the registry's own: the access tables may
        share the database); returns them."""
        existing = {
            row[0]
            for row in self.query(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            )
        }
        dropped = [table for table in tables if table.lower() in existing]
        with self.transaction_without_generation() as conn:
            for table in dropped:
                conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
        return dropped

    def close(self) -> None:
        self._pool.close()


def _text_safe(params: Sequence[Any]) -> tuple[Any, ...]:
    # PostgreSQL text cannot hold NUL, which a request's UIDs or match values may: such a value
    # matches nothing stored (as in SQLite), so it is made one that cannot either.
    return tuple(p.replace("\x00", "\ufffd") if isinstance(p, str) and "\x00" in p else p for p in params)


def _configure(conn: Any) -> None:
    # No JIT: the registry's queries are short, and JIT compilation, triggered by the planner's
    # cost estimates, added ~400 ms to QIDO answers of a few ms.
    conn.execute("SET jit = off")
    # The registry's indexes are read from memory or SSD, not spinning disks (PostgreSQL's
    # default of 4 assumes those): with it, the planner walked every study in date order for a
    # patient-name prefix rather than look the patients up (34 -> 4.6 ms at 1,000,000 instances).
    conn.execute("SET random_page_cost = 1.1")


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
