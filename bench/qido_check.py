#!/usr/bin/env python3
"""QIDO answers held against a plain reference at scale: 100,000 instances, 2,000 random queries.

Run from the repository root with the project's venv::

    .venv/bin/python bench/qido_check.py                          # SQLite, 100,000 instances
    .venv/bin/python bench/qido_check.py --registry-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/qido_check.py --size 2000 --queries 300  # what CI runs (both backends)

A registry is written by three sources of different priority through the registry's own write API
(``put_instances``, ``remove_paths`` in ``Registry.transaction()``, ``Registry.ranks``), updates
included (instances moving between series, studies and sources, copies, removals, files holding
another instance, patients renamed), while ``tests/qido_reference.py`` keeps a model of what it
must show. Random queries go through the HTTP app in-process (tests/conftest.py's ``Client``: the
real routes, parsing, SQL and JSON, no sockets), each answer compared with the reference's
matching (PS3.4 C.2.2.2 and the README's rules), results, order, paging, counts and returned
attributes. Prints the mismatches (there must be none: exit status 1 otherwise) and the timings.
The registry is removed at the end unless ``--keep``: a SQLite file under bench/out/, or on
PostgreSQL a schema of its own (``qido_check_<size>_<seed>``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

# `bench` is not an installed package: make it importable when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import OUT_DIR, log, percentile
from bench.report import machine_info
from gateway.app import create_app
from gateway.config import AuthConfig, Config, ServerConfig
from gateway.registry.store import Registry
from gateway.service import Gateway
from tests.conftest import Client
from tests.qido_reference import build_world, check, counts


def _postgres(base_url: str, schema: str, drop: bool = False) -> str:
    import psycopg

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        if not drop:
            conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in base_url else "?"
    return f"{base_url}{separator}options={quote(f'-csearch_path={schema}')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=100_000, help="instances (default 100,000)")
    parser.add_argument("--queries", type=int, default=2000, help="random queries (default 2,000)")
    parser.add_argument("--seed", type=int, default=1, help="the registry's and the queries' seed")
    parser.add_argument("--updates", type=float, default=0.15, help="updates per instance (default 0.15)")
    parser.add_argument("--registry-url", help="a PostgreSQL database (default: a SQLite file)")
    parser.add_argument("--keep", action="store_true", help="keep the registry (file or schema)")
    parser.add_argument("--show", type=int, default=20, help="mismatches printed (default 20)")
    args = parser.parse_args(argv)

    schema = f"qido_check_{args.size}_{args.seed}"
    folder: Path | None = None
    if args.registry_url:
        url = _postgres(args.registry_url, schema)
    else:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=OUT_DIR, prefix="qido-check-"))
        url = f"sqlite:///{folder / 'registry.db'}"
    registry = Registry(url)
    try:
        log(f"writing {args.size:,} instances and {int(args.size * args.updates):,} updates into {url}")
        world = build_world(registry, args.size, args.seed, registry.dialect, args.updates)
        started = time.perf_counter()
        registry.analyze()  # as a harvest of that size does at its end
        analyzed = time.perf_counter() - started
        started = time.perf_counter()
        expected = counts(world)  # the reference's rows, built once
        view = time.perf_counter() - started
        held = registry.counts()
        if any(held[k] != v for k, v in expected.items()):
            print(f"registry counts {held} differ from the reference's {expected}")
            return 1
        gateway = Gateway(Config(ServerConfig(), url, (), auth=AuthConfig(open=True)), registry=registry)
        log(f"{args.queries:,} queries")
        report = check(world, Client(create_app(gateway)), args.queries, args.seed)
    finally:
        registry.close()
        if args.registry_url and not args.keep:
            _postgres(args.registry_url, schema, drop=True)
        if folder is not None and not args.keep:
            shutil.rmtree(folder)

    machine = machine_info()
    cpu, python = machine["cpu_model"], machine["python"]
    print(f"machine: {cpu}, {machine['nproc']} cores, Python {python}, {machine['date']}")
    print(f"backend: {registry.dialect}; seed {args.seed}")
    print(
        f"registry: {expected['instances']:,} instances, {expected['series']:,} series, "
        f"{expected['studies']:,} studies, {expected['locations']:,} locations after "
        + ", ".join(f"{n:,} {kind}" for kind, n in sorted(world.operations.items()))
    )
    print(
        f"writing: {world.seconds['initial']:.1f} s initial, {world.seconds['updates']:.1f} s updates, "
        f"{analyzed:.1f} s analyze; reference rows: {view:.1f} s"
    )
    statuses = ", ".join(f"{n} x {status}" for status, n in sorted(report.statuses.items()))
    print(
        f"queries: {report.queries:,} ({statuses}); {report.results:,} results compared, "
        f"{report.empty:,} queries matching nothing"
    )
    for name, values in (
        ("gateway (HTTP, in-process)", report.gateway_seconds),
        ("reference", report.reference_seconds),
    ):
        ms = [v * 1000 for v in values]
        print(
            f"{name}: p50 {percentile(ms, 50):.1f} ms, p95 {percentile(ms, 95):.1f} ms, "
            f"max {max(ms):.0f} ms, total {sum(values):.1f} s"
        )
    print("slowest gateway answers:")
    for seconds, request in report.slowest:
        print(f"  {seconds * 1000:.0f} ms  {request[:300]}")
    print(f"mismatches: {len(report.mismatches)}")
    for line in report.mismatches[: args.show]:
        print(f"  {line}")
    return 1 if report.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
