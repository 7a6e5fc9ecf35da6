#!/usr/bin/env python3
"""The change feed's read latency at 1,000,000 events, and its retention: pruning them.

Run from the repository root with the project's venv::

    .venv/bin/python bench/changes.py                      # SQLite (and PostgreSQL if configured)
    .venv/bin/python bench/changes.py --postgresql postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/changes.py --events 100000 --reads 200
    .venv/bin/python bench/changes.py --prune              # then prune the 1,000,000, timed

A registry's ``changes`` table is filled in bulk (one INSERT ... SELECT in the database: the
events are synthetic, ``--patients`` patients of ``--studies-per-patient`` studies each, in
random order, with a third of the events without an INS), then ``Registry.changes(since, 100,
restriction)`` is timed in-process, ``since`` drawn at random over the whole feed for each read:
unfiltered (an open gateway, the subscription worker), for a professional restricted to
``--granted`` patients (the restriction their grants give; some studies hidden), and for a study
link. Prints p50/p95 in ms per kind and backend. PostgreSQL is used when ``--postgresql`` or
GATEWAY_TEST_POSTGRESQL gives a URL, in a schema of its own dropped at the end.

With ``--prune``: ``--keep`` newer events are appended, then the ``--events`` older ones are
pruned (``Registry.prune_changes``, batches of ``changes.PRUNE_BATCH``) while a reader thread
reads pages of the kept events without pause (unfiltered and for a professional, alternately);
prints the time to prune, and the read p50/p95 during pruning beside the same reads at rest.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

# `bench` is not an installed package: make it importable when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import log, percentile  # noqa: E402
from gateway.registry import changes  # noqa: E402
from gateway.registry.store import Registry  # noqa: E402
from gateway.types import Restriction  # noqa: E402

_KINDS = ("instances.added", "instances.added", "instances.removed", "study.available", "study.updated")


def fill(registry: Registry, events: int, patients: int, studies_per_patient: int, offset: int = 0) -> None:
    """``events`` synthetic events in one statement: event i concerns a pseudo-random study s of
    ``patients * studies_per_patient`` (a multiplicative hash of i), of patient
    ``s // studies_per_patient``, without an INS for one study in three; its time is 1.7e9 +
    ``offset`` + i seconds."""
    studies = patients * studies_per_patient
    kinds = ", ".join(f"'{k}'" for k in _KINDS)
    if registry.dialect == "sqlite":
        numbers = (
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "SELECT i, (i * 2654435761) % ? AS s FROM n"
        )
        pick = f"json_extract('[{kinds.replace(chr(39), chr(34))}]', '$[' || (i % {len(_KINDS)}) || ']')"
        third = "s % 3"
        params: tuple[int, ...] = (events, studies)
    else:  # psycopg takes % for a placeholder: mod()
        numbers = "SELECT i, mod(i * 2654435761, ?) AS s FROM generate_series(1, ?::bigint) AS g(i)"
        pick = f"(ARRAY[{kinds}])[mod(i, {len(_KINDS)}) + 1]"
        third = "mod(s, 3)"
        params = (studies, events)
    sql = (
        "INSERT INTO changes (time, kind, source, StudyInstanceUID, SeriesInstanceUID, patient, instances) "
        f"SELECT 1.7e9 + {int(offset)} + i, {pick}, 'archive', '1.2.826.0.7.' || s, "
        "'1.2.826.0.7.' || s || '.1', "
        f"CASE WHEN {third} = 0 THEN NULL ELSE '1' || ({_INS_BASE} + s / {studies_per_patient}) END, 64 "
        f"FROM ({numbers}) numbers"
    )
    with registry.db.transaction() as conn:
        conn.execute(sql, params)
    registry.analyze(vacuum=True)


_INS_BASE = 100_000_000_000  # the synthetic INS: "1" and 12 digits


def ins(patient: int) -> str:
    return f"1{_INS_BASE + patient}"


def measure(
    registry: Registry, reads: int, restriction: Callable[[random.Random], Restriction | None], seed: int
) -> tuple[list[float], int]:
    """Milliseconds per read, and the events read in all."""
    rng = random.Random(seed)
    last = registry.last_change()
    times, read = [], 0
    for _ in range(reads):
        since, limit = rng.randrange(0, last), 100
        chosen = restriction(rng)
        started = time.perf_counter()
        found = registry.changes(since, limit, chosen)
        times.append((time.perf_counter() - started) * 1000)
        read += len(found)
    return times, read


def run(url: str, label: str, args: argparse.Namespace) -> list[tuple[str, str, float, float, float]]:
    registry = Registry(url)
    try:
        started = time.perf_counter()
        fill(registry, args.events, args.patients, args.studies_per_patient)
        log(f"{label}: {registry.last_change():,} events written in {time.perf_counter() - started:.1f} s")
        patients, per = args.patients, args.studies_per_patient

        def professional(rng: random.Random) -> Restriction:
            granted = rng.sample(range(patients), args.granted)
            hidden = {f"1.2.826.0.7.{p * per}" for p in granted[:1]}  # one hidden study
            return Restriction(patients=frozenset(ins(p) for p in granted), hidden=frozenset(hidden))

        def link(rng: random.Random) -> Restriction:
            return Restriction(studies=frozenset({f"1.2.826.0.7.{rng.randrange(patients * per)}"}))

        rows = []
        cases: list[tuple[str, Callable[[random.Random], Restriction | None]]] = [
            ("unfiltered", lambda rng: None),
            (f"professional, {args.granted} patients", professional),
            (f"professional, {args.many} patients", lambda rng: _many(rng, patients, args.many)),
            ("study link", link),
        ]
        for name, restriction in cases:
            measure(registry, min(20, args.reads), restriction, seed=1)  # warm the cache
            times, read = measure(registry, args.reads, restriction, seed=2)
            rows.append((label, name, percentile(times, 50), percentile(times, 95), read / args.reads))
            log(f"{label} {name}: p50 {rows[-1][2]:.2f} ms, p95 {rows[-1][3]:.2f} ms")
        if args.prune:
            PRUNED.append(prune(registry, label, args, professional))
        return rows
    finally:
        registry.close()


PRUNED: list[tuple[str, int, float, float, float, float, float, int]] = []


def prune(
    registry: Registry,
    label: str,
    args: argparse.Namespace,
    professional: Callable[[random.Random], Restriction],
) -> tuple[str, int, float, float, float, float, float, int]:
    """Append ``--keep`` newer events, then prune the ``--events`` older ones while a thread reads
    pages of the kept ones; (backend, pruned, seconds, read p50/p95 at rest, p50/p95 during,
    reads during)."""
    first = registry.last_change()
    fill(registry, args.keep, args.patients, args.studies_per_patient, offset=args.events)
    last = registry.last_change()
    rng = random.Random(3)

    def read_once(times: list[float]) -> None:
        since = rng.randrange(first, last)
        chosen = professional(rng) if len(times) % 2 else None
        started = time.perf_counter()
        registry.changes(since, 100, chosen)
        times.append((time.perf_counter() - started) * 1000)

    resting: list[float] = []
    for _ in range(args.reads):
        read_once(resting)
    during: list[float] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            read_once(during)

    thread = threading.Thread(target=reader)
    thread.start()
    started = time.perf_counter()
    try:
        pruned = registry.prune_changes(older_than=1.7e9 + args.events + 0.5)
    finally:
        done.set()
        thread.join()
    seconds = time.perf_counter() - started
    assert registry.changes_horizon() == first, (registry.changes_horizon(), first)
    log(
        f"{label}: {pruned:,} events pruned in {seconds:.1f} s ({changes.PRUNE_BATCH} per batch); reads "
        f"p95 {percentile(resting, 95):.2f} ms at rest, {percentile(during, 95):.2f} ms during"
    )
    return (
        label, pruned, seconds, percentile(resting, 50), percentile(resting, 95),
        percentile(during, 50), percentile(during, 95), len(during),
    )  # fmt: skip


def _many(rng: random.Random, patients: int, count: int) -> Restriction:
    return Restriction(patients=frozenset(ins(p) for p in rng.sample(range(patients), count)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--studies-per-patient", type=int, default=2)
    parser.add_argument("--granted", type=int, default=5, help="patients a professional is granted")
    parser.add_argument("--many", type=int, default=500, help="patients of an organization-wide grant")
    parser.add_argument("--reads", type=int, default=500, help="timed reads per kind")
    parser.add_argument("--postgresql", default=os.environ.get("GATEWAY_TEST_POSTGRESQL"))
    parser.add_argument("--prune", action="store_true", help="then time pruning the --events old ones")
    parser.add_argument("--keep", type=int, default=100_000, help="--prune: newer events kept and read")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="changes-bench-") as folder:
        rows += run(f"sqlite:///{Path(folder) / 'registry.db'}", "sqlite", args)
    if args.postgresql:
        import psycopg

        schema = f"bench_changes_{secrets.token_hex(4)}"
        with psycopg.connect(args.postgresql, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        try:
            separator = "&" if "?" in args.postgresql else "?"
            rows += run(
                f"{args.postgresql}{separator}options={quote(f'-csearch_path={schema}')}", "postgresql", args
            )
        finally:
            with psycopg.connect(args.postgresql, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(
        f"\nchange feed reads, {args.events:,} events, limit=100, since random ({args.reads} reads per kind)"
    )
    print(f"{'backend':<11} {'caller':<30} {'p50 ms':>8} {'p95 ms':>8} {'events/read':>12}")
    for label, name, p50, p95, per_read in rows:
        print(f"{label:<11} {name:<30} {p50:>8.2f} {p95:>8.2f} {per_read:>12.1f}")
    if PRUNED:
        print(
            f"\nretention: {args.events:,} events older than the cutoff pruned, {args.keep:,} newer kept "
            f"and read meanwhile (limit=100, unfiltered and professional alternately)"
        )
        print(
            f"{'backend':<11} {'pruned':>10} {'seconds':>8} {'events/s':>9} {'rest p50':>9} "
            f"{'rest p95':>9} {'during p50':>11} {'during p95':>11} {'reads':>6}"
        )
        for label, pruned, seconds, r50, r95, d50, d95, reads in PRUNED:
            print(
                f"{label:<11} {pruned:>10,} {seconds:>8.1f} {pruned / seconds:>9,.0f} {r50:>9.2f} "
                f"{r95:>9.2f} {d50:>11.2f} {d95:>11.2f} {reads:>6}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
