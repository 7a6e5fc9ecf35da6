#!/usr/bin/env python3
"""QIDO latency with a large registry: 100,000 and 1,000,000 instances by default.

Run from the repository root with the project's venv::

    .venv/bin/python bench/scale.py                        # 100,000 and 1,000,000 instances
    .venv/bin/python bench/scale.py --sizes 100000 --requests 50

For each size, a registry of synthetic instances is generated (or reused from bench/out/scale/,
keyed by size and seed), served by ``gateway serve --no-harvest`` (open access, no sources), and
each kind of QIDO request below is timed through the real HTTP stack: sequential requests from one
httpx client, the kinds interleaved, each request with its own random values drawn from the
registry (patients, 3-month windows, name prefixes, studies) so that no cache flatters a figure.
The modality kinds are the exception: their value is the fixed ``MR`` the issue names. Each kind's
SQL is also timed in-process on the same values (the SQL `gateway.registry.qido` compiles), which
splits database time from HTTP and JSON time. A kind that has spent ``--budget`` seconds (60)
stops early: a query taking tens of seconds must not hold the run for hours. Prints one table
(target: p95 <= 20 ms at 1,000,000 instances) with the SQLite query plans of the kinds that miss
it; writes everything, raw latencies included, to bench/out/scale.json.

The registries come from ``bench/synthetic.py`` (their shape, generation and cache).
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

# `bench` is not an installed package: make it importable when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


import httpx
import orjson

from bench.common import JSON_ACCEPT, OUT_DIR, BenchError, log, percentile
from bench.report import machine_info, verdict
from bench.servers import gateway_server, log_problems
from bench.study import warm_page_cache
from bench.synthetic import INS_OID, Prepared, Shape, open_registry, prepare_registry
from gateway.dicomweb.query import parse_qido
from gateway.registry.record import fold_text
from gateway.registry.search import plan_query
from gateway.registry.store import Registry

TARGET_P95_MS = 20.0
TARGET_SIZE = 1_000_000  # the target applies from this registry size on
SQL_SAMPLES = 20  # requests of each kind whose SQL is also timed in-process


# -- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One QIDO request: its level, matching keys and, for a study's series or instances, the
    study in the path."""

    level: str  # "study" | "series" | "instance"
    params: dict[str, str]
    study: str | None = None

    @property
    def url(self) -> str:
        if self.study is None:
            path = {"study": "studies", "series": "series", "instance": "instances"}[self.level]
        else:
            path = f"studies/{self.study}/{'series' if self.level == 'series' else 'instances'}"
        return f"/dicom-web/{path}"

    def sql(self, registry: Registry) -> tuple[str, list[Any]]:
        """The SQL the gateway runs for this request (its QIDO planner, no access restriction)."""
        scope = {"StudyInstanceUID": self.study} if self.study else {}
        sql, params, _ = plan_query(registry, parse_qido(list(self.params.items()), self.level, scope))
        return sql, params


@dataclass
class Samples:
    """Values drawn from the registry itself, so that every request names something it holds."""

    patient_ids: list[str]
    ins: list[str]
    names: list[str]
    studies: list[str]

    @classmethod
    def of(cls, registry: Registry) -> Samples:
        patients = registry.query("SELECT PatientID, INS, PatientName FROM patients ORDER BY id")
        studies = registry.query("SELECT StudyInstanceUID FROM studies ORDER BY StudyInstanceUID")
        return cls(
            [p[0] for p in patients],
            [p[1] for p in patients if p[1]],
            [p[2] for p in patients],
            [s[0] for s in studies],
        )


def _window(rng: random.Random, _: Samples) -> Request:
    month = rng.randrange(12 * 10 - 2)  # the first of three months, within the 10 years
    first, last = divmod(month, 12), divmod(month + 2, 12)
    end = calendar.monthrange(2015 + last[0], last[1] + 1)[1]
    value = f"{2015 + first[0]}{first[1] + 1:02d}01-{2015 + last[0]}{last[1] + 1:02d}{end}"
    return Request("study", {"StudyDate": value})


def _wildcard(rng: random.Random, samples: Samples) -> Request:
    # What a user types: the first letters of a family name, upper case, no accents.
    family = rng.choice(samples.names).split("^")[0]
    return Request("study", {"PatientName": fold_text(family)[:4].upper() + "*"})


def _fuzzy(rng: random.Random, samples: Samples) -> Request:
    # One word, the start of a family or given name, as typed in a search box ("franc").
    component = rng.choice(rng.choice(samples.names).split("^")[:2])
    return Request("study", {"fuzzymatching": "true", "PatientName": fold_text(component)[:5]})


KINDS: dict[str, Callable[[random.Random, Samples], Request]] = {
    "study by PatientID": lambda rng, s: Request("study", {"PatientID": rng.choice(s.patient_ids)}),
    "study by INS (PatientID + INS issuer)": lambda rng, s: Request(
        "study", {"PatientID": rng.choice(s.ins), "IssuerOfPatientID": INS_OID}
    ),
    "study by StudyDate, 3-month window": _window,
    "study by ModalitiesInStudy=MR": lambda rng, s: Request("study", {"ModalitiesInStudy": "MR"}),
    "series by Modality=MR": lambda rng, s: Request("series", {"Modality": "MR"}),
    "study by PatientName=XXXX* (wildcard)": _wildcard,
    "study by PatientName, fuzzymatching": _fuzzy,
    "series of a study": lambda rng, s: Request("series", {}, rng.choice(s.studies)),
    "instances of a study": lambda rng, s: Request("instance", {}, rng.choice(s.studies)),
}
NON_EMPTY = set(KINDS) - {"study by StudyDate, 3-month window"}  # values come from the registry


# -- measurement ----------------------------------------------------------------------------------


@dataclass
class KindResult:
    latencies_ms: list[float] = field(default_factory=list)
    results: list[int] = field(default_factory=list)
    sql_ms: list[float] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    sql: str = ""
    example: str = ""

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


WARMUP = 2  # untimed requests of each kind first: imports, first-use caches, the page cache


def measure_size(
    workdir: Path, prepared: Prepared, requests: int, seed: int, budget: float, limit: int | None = None
) -> tuple[dict[str, KindResult], list[str]]:
    """Every kind, ``requests`` times (fewer when a kind uses up its ``budget`` seconds), through
    a gateway serving the registry; then each kind's SQL in-process, and its query plan."""
    size = prepared.shape.instances
    if not prepared.url:
        warm_page_cache([prepared.path])  # a reused registry: read from memory, as a served one is
    registry = open_registry(prepared.target)
    try:
        samples = Samples.of(registry)
        rng = random.Random(f"{seed}-{size}")
        planned = {
            kind: [make(rng, samples) for _ in range(WARMUP + requests)] for kind, make in KINDS.items()
        }
        if limit:  # a viewer's page (OHIF asks for limit=101) rather than the server's maximum
            for kind_requests in planned.values():
                for request in kind_requests:
                    request.params["limit"] = str(limit)
        config = workdir / f"gateway-{size}.toml"
        config.write_text(
            f'[server]\nhost = "127.0.0.1"\n[registry]\nurl = "{prepared.url or f"sqlite:///{prepared.path}"}"\n'
            "[auth]\nopen = true\n"  # no access restriction in the SQL; no [[sources]]: no harvest
        )
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        with gateway_server(config, logs, str(size)) as server:
            out = time_http(f"http://127.0.0.1:{server.port}", planned, budget)
        for kind, result in out.items():
            timed = planned[kind][WARMUP : WARMUP + len(result.latencies_ms)]
            result.sql_ms = time_sql(registry, timed[:SQL_SAMPLES], budget / 4)
            result.sql, params = timed[0].sql(registry)
            result.plan = query_plan(registry, result.sql, params)
    finally:
        registry.close()
    return out, log_problems(logs / f"gateway-serve-{size}.log")


def time_http(base_url: str, planned: dict[str, list[Request]], budget: float) -> dict[str, KindResult]:
    """One keep-alive client, sequential requests, the kinds interleaved so that none profits from
    running alone; a kind that has spent ``budget`` seconds stops (its cell says how many ran)."""
    out = {kind: KindResult(example=_example(requests[WARMUP])) for kind, requests in planned.items()}
    spent = dict.fromkeys(planned, 0.0)
    rounds = len(next(iter(planned.values())))
    with httpx.Client(base_url=base_url, headers={"Accept": JSON_ACCEPT}, timeout=600) as client:
        for i in range(rounds):
            if i and i % 50 == 0:
                log(f"  {i} / {rounds} rounds")
            for kind, result in out.items():
                if spent[kind] > budget:
                    continue
                request = planned[kind][i]
                start = time.perf_counter()
                response = client.get(request.url, params=request.params)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    raise BenchError(f"{_example(request)} -> {response.status_code}: {response.text[:200]}")
                found = len(orjson.loads(response.content))
                if found == 0 and kind in NON_EMPTY:
                    raise BenchError(f"{_example(request)}: no result")
                if i >= WARMUP:
                    spent[kind] += elapsed
                    result.latencies_ms.append(elapsed * 1000)
                    result.results.append(found)
    return out


def time_sql(registry: Registry, requests: list[Request], budget: float) -> list[float]:
    """The SQL of these requests run in-process, in ms: what the database costs, without HTTP and
    JSON. The first run is not timed (as over HTTP, it warms up)."""
    times: list[float] = []
    for i, request in enumerate(requests[:1] + requests):
        sql, params = request.sql(registry)
        start = time.perf_counter()
        registry.query(sql, params)
        if i:
            times.append((time.perf_counter() - start) * 1000)
        if sum(times) > budget * 1000:
            break
    return times


def _example(request: Request) -> str:
    return f"{request.url}?{httpx.QueryParams(request.params)}".rstrip("?")


def query_plan(registry: Registry, sql: str, params: list[Any]) -> list[str]:
    """The database's plan: EXPLAIN QUERY PLAN as SQLite's shell prints it (one line per step,
    indented under its parent), or PostgreSQL's EXPLAIN."""
    if registry.dialect == "postgresql":
        return [row[0] for row in registry.query("EXPLAIN " + sql, params)]
    rows = registry.query("EXPLAIN QUERY PLAN " + sql, params)
    depth: dict[int, int] = {0: -1}
    lines = []
    for node, parent, _, detail in rows:
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + str(detail))
    return lines


# -- report ---------------------------------------------------------------------------------------


@dataclass
class SizeRun:
    prepared: Prepared | None = None
    kinds: dict[str, KindResult] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    error: str = ""

    def json(self) -> dict[str, Any]:
        registry = None
        if self.prepared is not None:
            registry = {"path": str(self.prepared.path), "bytes": self.prepared.bytes}
            registry |= {"reused": self.prepared.reused, **asdict(self.prepared.shape)}
        kinds = {
            kind: {"p50_ms": k.p(50), "p95_ms": k.p(95), "p99_ms": k.p(99), **asdict(k)}
            for kind, k in self.kinds.items()
        }
        return {"error": self.error, "registry": registry, "kinds": kinds, "log": self.problems[:50]}


def table_rows(runs: dict[int, SizeRun], requests: int) -> tuple[list[tuple[str, ...]], list[str]]:
    """Rows (measurement, one cell per size, target, result) and the kinds that miss the target.

    Not bench/report.py's Table: its columns are one gateway and one Orthanc figure, here each
    size is a column, so that a kind reads across sizes on one line."""

    def row(
        label: str, text: Callable[[SizeRun], str], target: str = "-", result: str = "info"
    ) -> tuple[str, ...]:
        cells = ("ERROR" if r.error else text(r) if r.prepared is not None else "" for r in runs.values())
        return (label, *cells, target, result)

    def kind_text(r: SizeRun, *, kind: str) -> str:
        k = r.kinds.get(kind)
        if k is None:
            return "-"
        n = "" if len(k.latencies_ms) == requests else f"; n={len(k.latencies_ms)}"
        return (
            f"{k.p(50):.1f} / {k.p(95):.1f} / {k.p(99):.1f} ms; {sum(k.results) / len(k.results):,.0f} res; "
            f"SQL {percentile(k.sql_ms, 50):.2f}{n}"
        )

    def shape(r: SizeRun) -> Shape:
        assert r.prepared is not None
        return r.prepared.shape

    def size_text(r: SizeRun) -> str:
        assert r.prepared is not None
        backend = "PostgreSQL tables" if r.prepared.url else "SQLite file"
        size = r.prepared.bytes
        return f"{backend}: {size / 1e6:,.0f} MB ({size / shape(r).instances:,.0f} B/inst)"

    rows = [
        ("measurement", *(f"{size:,} instances" for size in runs), "target", "result"),
        row(
            "registry: patients / studies / series",
            lambda r: f"{shape(r).patients:,} / {shape(r).studies:,} / {shape(r).series:,}",
        ),
        row("registry size", size_text),
        row(
            "generation via Registry.put_instances",
            lambda r: (
                f"{shape(r).seconds:.0f} s ({shape(r).instances / shape(r).seconds:,.0f} inst/s"
                + (", reused)" if r.prepared and r.prepared.reused else ")")
            ),
            "few minutes",
        ),
    ]
    at_target = [size for size in runs if size >= TARGET_SIZE and runs[size].kinds]
    misses = [k for k in KINDS if any(runs[size].kinds[k].p(95) > TARGET_P95_MS for size in at_target)]
    for kind in KINDS:
        result = verdict(kind not in misses) if at_target else "info"
        rows.append(
            row(f"QIDO {kind}", partial(kind_text, kind=kind), f"p95 <= {TARGET_P95_MS:.0f} ms", result)
        )
    failed = any(r.problems or r.error for r in runs.values())
    rows.append(
        row("gateway log: ERROR lines / tracebacks", lambda r: str(len(r.problems)), "0", verdict(not failed))
    )
    return rows, misses


def render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def publish(
    runs: dict[int, SizeRun], machine: dict[str, Any], args: argparse.Namespace, elapsed: float
) -> None:
    """Print the machine line, the table, the plans of the misses and log problems; write the JSON."""
    rows, misses = table_rows(runs, args.requests)
    print(
        f"machine: nproc={machine['nproc']}, CPU {machine['cpu_model']}, Python {machine['python']}, "
        f"{machine['date']}; load average at start {machine['loadavg']}; run took {elapsed:.0f} s\n"
        f"QIDO cells: p50 / p95 / p99 over {args.requests} sequential HTTP requests; mean results "
        f"per request; SQL: p50 of the same SQL in-process (up to {SQL_SAMPLES} requests)"
    )
    print(render(rows))
    largest = max((size for size in runs if runs[size].kinds), default=0)
    for kind in misses:
        k = runs[largest].kinds[kind]
        print(f"\nMISS {kind} at {largest:,}: e.g. {k.example}\n  plan:\n    " + "\n    ".join(k.plan))
    for size, run in runs.items():
        for line in ([run.error] if run.error else []) + run.problems[:10]:
            print(f"{size:,} instances: {line}")
    out = OUT_DIR / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": machine,
        "elapsed_s": elapsed,
        "args": {k: str(v) for k, v in vars(args).items()},
        "target": {"p95_ms": TARGET_P95_MS, "from_instances": TARGET_SIZE},
        "table": rows,
        "sizes": {str(size): run.json() for size, run in runs.items()},
    }
    out.write_text(json.dumps(summary, indent=1))
    print(f"\nJSON: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="instances (100000 1000000)"
    )
    parser.add_argument("--requests", type=int, default=200, help="timed requests per kind and size (200)")
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds of timed requests per kind and size; a slower kind stops early (60)",
    )
    parser.add_argument("--seed", type=int, default=0, help="generation and request values (0)")
    parser.add_argument(
        "--regenerate", action="store_true", help="generate again even if a cached registry is there"
    )
    parser.add_argument(
        "--limit", type=int, help="QIDO limit on every request (a viewer's page: 101); default none"
    )
    parser.add_argument(
        "--registry-url",
        help="a PostgreSQL database (postgresql://...) instead of SQLite files: one schema per size",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=OUT_DIR / "scale",
        help="cached registries, gateway configs and logs (default bench/out/scale)",
    )
    args = parser.parse_args(argv)
    if min(*args.sizes, args.requests) < 1:
        parser.error("sizes and requests must be positive")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    machine["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.perf_counter()
    runs = {size: SizeRun() for size in sorted(set(args.sizes))}
    for size, run in runs.items():
        try:
            run.prepared = prepare_registry(workdir, size, args.seed, args.regenerate, args.registry_url)
            log(f"{size:,} instances: serving, {len(KINDS)} kinds x {args.requests} requests")
            run.kinds, run.problems = measure_size(
                workdir, run.prepared, args.requests, args.seed, args.budget, args.limit
            )
        except Exception as exc:  # noqa: BLE001 - reported in the table; the next size still runs
            log(f"!! {size:,} instances: {type(exc).__name__}: {exc}")
            run.error = f"{type(exc).__name__}: {exc}"[:300]
    publish(runs, machine, args, time.perf_counter() - started)
    return 1 if any(run.error for run in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
