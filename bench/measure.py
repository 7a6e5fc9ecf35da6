"""The measurements on one server: index rate (`gateway index`), QIDO latency, study /metadata,
frame loads and the whole-study retrieve. Each adds its rows to the table or returns raw results
for the rows comparing both servers."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from bench.common import (
    CHUNK,
    DICOM_ACCEPT,
    JSON_ACCEPT,
    REPO,
    TARGET_INDEX_PER_CORE,
    BenchError,
    Http,
    log,
    percentile,
)
from bench.load import frame_load, write_frame_urls
from bench.report import Table, verdict
from bench.servers import SOURCE_NAME, Server, fresh_registry
from bench.study import Study, warm_page_cache


@dataclass
class IndexRun:
    """One `gateway index` run."""

    workers: int
    harvest_seconds: float  # as the harvest recorded it (started..finished in the registry)
    wall_seconds: float  # the whole CLI process, Python start-up included
    indexed: int

    @property
    def rate(self) -> float:
        return self.indexed / self.harvest_seconds


def run_index(config: Path, registry: Path, workers: int | None, expected: int) -> IndexRun:
    """`gateway index` on a fresh registry. The harvest time comes from the run the CLI records in
    the registry (float timestamps), because the CLI prints it to only 0.1 s; the process wall
    time is kept too (it adds interpreter start-up and imports)."""
    fresh_registry(registry)
    cmd = [sys.executable, "-m", "gateway", "index", "--config", str(config)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"gateway index exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    with contextlib.closing(sqlite3.connect(registry)) as db:
        row = db.execute(
            "SELECT started, finished, indexed, failed FROM sources WHERE name=?", (SOURCE_NAME,)
        ).fetchone()
    if row is None:
        raise BenchError("gateway index recorded no run in the registry")
    started, finished, indexed, failed = row
    if indexed != expected or failed:
        raise BenchError(f"gateway index: {indexed} indexed, {failed} failed, expected {expected}")
    return IndexRun(workers or (os.cpu_count() or 1), finished - started, wall, indexed)


def measure_index(table: Table, config: Path, registry: Path, study: Study, repeats: int) -> None:
    """Workers 1 and the CLI default (one per core), each on fresh registries with a warm page
    cache; the median of `repeats` runs. The last run leaves the registry the server will use."""
    cores = len(os.sched_getaffinity(0))
    warm_page_cache(study.paths)
    for workers in (1, None):
        runs = [run_index(config, registry, workers, study.n) for _ in range(repeats)]
        median = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
        used = min(median.workers, cores)
        per_core = median.rate / used
        label = "default" if workers is None else str(workers)
        table.add(
            f"index rate, --workers {label} ({median.workers} proc, warm cache)",
            f"{median.rate:.0f} inst/s = {per_core:.0f}/s/core "
            f"({median.harvest_seconds:.2f} s; CLI {median.wall_seconds:.2f} s)",
            "",
            f">= {TARGET_INDEX_PER_CORE:.0f}/s/core",
            verdict(per_core >= TARGET_INDEX_PER_CORE),
            workers=median.workers,
            cores_used=used,
            instances_per_s=median.rate,
            per_core=per_core,
            harvest_s=[r.harvest_seconds for r in runs],
            cli_wall_s=[r.wall_seconds for r in runs],
        )
        log(
            f"index workers={label}: {median.rate:.0f} inst/s (runs: "
            f"{', '.join(f'{r.rate:.0f}' for r in runs)})"
        )


def qido_kinds(study: Study) -> dict[str, str]:
    """The four kinds of QIDO request timed, by name."""
    s = quote(study.uid)
    year = study.study_date[:4]
    return {
        "study by PatientID": "/dicom-web/studies?" + urlencode({"PatientID": study.patient_id}),
        "study by date range": "/dicom-web/studies?" + urlencode({"StudyDate": f"{year}0101-{year}1231"}),
        "series of study": f"/dicom-web/studies/{s}/series",
        "instances of study (limit=100)": f"/dicom-web/studies/{s}/instances?limit=100",
    }


def measure_qido(table: Table, server: Server, study: Study, total: int) -> None:
    """Sequential requests on one keep-alive connection, the kinds interleaved so none profits
    from running alone; each response is checked (status and result count)."""
    kinds = qido_kinds(study)
    expected = {
        "study by PatientID": 1,
        "study by date range": None,
        "series of study": 1,
        "instances of study (limit=100)": min(100, study.n),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    http_ = Http(server.port)
    try:
        for path in kinds.values():  # one untimed warm-up each
            http_.get(path, {"Accept": JSON_ACCEPT})
        for i in range(total):
            kind = list(kinds)[i % len(kinds)]
            start = time.perf_counter()
            status, body = http_.get(kinds[kind], {"Accept": JSON_ACCEPT})
            times[kind].append((time.perf_counter() - start) * 1000)
            if status != 200:
                raise BenchError(f"QIDO {kinds[kind]} -> {status}: {body[:200]!r}")
            if i < len(kinds):  # check the content once per kind
                results = json.loads(body)
                want = expected[kind]
                if (want is not None and len(results) != want) or not results:
                    raise BenchError(f"QIDO {kinds[kind]}: {len(results)} results, expected {want}")
    finally:
        http_.close()
    everything = [t for values in times.values() for t in values]
    rows = {**times, f"all ({len(everything)} sequential)": everything}
    for kind, values in rows.items():
        table.add(
            f"QIDO {kind}: p50 / p95",
            f"{percentile(values, 50):.1f} / {percentile(values, 95):.1f} ms",
            "",
            "-",
            "info",
            requests=len(values),
            p50_ms=percentile(values, 50),
            p95_ms=percentile(values, 95),
        )


def list_instances(server: Server, study: Study) -> list[tuple[str, str]]:
    """(series, instance) UIDs of the study via QIDO, paged (the gateway caps a page at 1000)."""
    found: dict[str, tuple[str, str, int]] = {}
    http_ = Http(server.port)
    try:
        page, offset = 1000, 0
        while True:
            query = urlencode(
                {"includefield": "SeriesInstanceUID,InstanceNumber", "limit": page, "offset": offset}
            )
            status, body = http_.get(
                f"/dicom-web/studies/{quote(study.uid)}/instances?{query}", {"Accept": JSON_ACCEPT}
            )
            if status == 204:
                break
            if status != 200:
                raise BenchError(f"QIDO instances page at {offset} -> {status}: {body[:200]!r}")
            results = json.loads(body)
            for item in results:
                sop = item["00080018"]["Value"][0]
                number = int(item.get("00200013", {}).get("Value", [0])[0])
                found[sop] = (item["0020000E"]["Value"][0], sop, number)
            if len(results) < page:
                break
            offset += page
    finally:
        http_.close()
    if len(found) != study.n:
        raise BenchError(f"QIDO listed {len(found)} instances, the study has {study.n}")
    return [(series, sop) for series, sop, _ in sorted(found.values(), key=lambda v: v[2])]


def time_metadata(server: Server, study: Study, repeats: int) -> dict[str, Any]:
    """First GET /studies/{s}/metadata, then `repeats` warm ones; the full body read is timed."""
    path = f"/dicom-web/studies/{quote(study.uid)}/metadata"
    http_ = Http(server.port)
    times, size = [], 0
    try:
        for i in range(repeats + 1):
            start = time.perf_counter()
            status, body = http_.get(path, {"Accept": JSON_ACCEPT})
            times.append((time.perf_counter() - start) * 1000)
            if status != 200:
                raise BenchError(f"{server.name} metadata -> {status}: {body[:200]!r}")
            if i == 0:
                size = len(body)
                count = len(json.loads(body))
                if count != study.n:
                    raise BenchError(f"{server.name} metadata holds {count} instances, expected {study.n}")
    finally:
        http_.close()
    return {
        "first_ms": times[0],
        "warm_median_ms": statistics.median(times[1:]),
        "warm_ms": times[1:],
        "bytes": size,
    }


def whole_study_retrieve(server: Server, study: Study) -> dict[str, Any]:
    """GET /studies/{s} as multipart application/dicom, read as a stream and discarded."""
    http_ = Http(server.port, timeout=600)
    try:
        start = time.perf_counter()
        response = http_.request("GET", f"/dicom-web/studies/{quote(study.uid)}", {"Accept": DICOM_ACCEPT})
        if response.status != 200:
            raise BenchError(f"{server.name} study retrieve -> {response.status}: {response.read(200)!r}")
        received = 0
        while chunk := response.read(CHUNK):
            received += len(chunk)
        seconds = time.perf_counter() - start
    finally:
        http_.close()
    announced = response.getheader("Content-Length")
    if announced is not None and int(announced) != received:
        raise BenchError(f"{server.name} study retrieve: {received} bytes, announced {announced}")
    if received < study.size:
        raise BenchError(f"{server.name} study retrieve: {received} bytes < {study.size} on disk")
    return {"seconds": seconds, "bytes": received, "mb_per_s": received / 1e6 / seconds}


def measure_metadata(table: Table, server: Server, study: Study, repeats: int) -> dict[str, Any]:
    """{"metadata": timings}, or {} (and an ERROR row) when the measurement failed."""
    with table.section(f"{server.name} metadata"):
        result = time_metadata(server, study, repeats)
        log(
            f"{server.name} metadata: first {result['first_ms']:.1f} ms, warm median "
            f"{result['warm_median_ms']:.1f} ms"
        )
        return {"metadata": result}
    return {}


def measure_frames(
    table: Table,
    server: Server,
    study: Study,
    workdir: Path,
    args: argparse.Namespace,
    instances: list[tuple[str, str]],
) -> dict[str, Any]:
    """The frame loads at each concurrency on one server: {"frames_c<N>": best LoadResult}."""
    out: dict[str, Any] = {}
    urls = write_frame_urls(workdir / f"urls-{server.name}.txt", server.port, study, instances)
    warm_page_cache(study.paths)
    with table.section(f"{server.name} frames warm-up"):
        frame_load(urls, min(study.n, 500), 8, study.frame_bytes)
    for connections in args.connections:
        requests = args.frame_requests or connections * study.n * args.frame_passes
        with table.section(f"{server.name} frames c={connections}"):
            # Best of `load_repeats`: on a 2-core box sharing CPU with h2load, single runs of
            # either server vary by 10-30 %; the best run is the least disturbed one.
            runs = []
            for _ in range(args.load_repeats):
                runs.append(frame_load(urls, requests, connections, study.frame_bytes))
                log(
                    f"{server.name} frames c={connections}: {runs[-1].frames_per_s:.0f} frames/s, "
                    f"{runs[-1].mb_per_s:.0f} MB/s ({requests} requests in {runs[-1].seconds:.1f} s)"
                )
            best = max(runs, key=lambda r: r.frames_per_s)
            best.all_frames_per_s = [r.frames_per_s for r in runs]
            out[f"frames_c{connections}"] = best
    return out


def measure_loads(
    table: Table,
    server: Server,
    study: Study,
    workdir: Path,
    args: argparse.Namespace,
    instances: list[tuple[str, str]],
) -> dict[str, Any]:
    """Frames at each concurrency, then the whole-study retrieve, on one server. Raw results are
    returned; the rows comparing both servers are added once both have run."""
    out = measure_frames(table, server, study, workdir, args, instances)
    with table.section(f"{server.name} whole-study retrieve"):
        # A single ~0.5 s transfer is at the mercy of one scheduler hiccup: best of 3 (cheap).
        runs = [whole_study_retrieve(server, study) for _ in range(3)]
        out["retrieve"] = max(runs, key=lambda r: r["mb_per_s"])
        out["retrieve"]["all_mb_per_s"] = [r["mb_per_s"] for r in runs]
        log(
            f"{server.name} whole-study retrieve: "
            f"{', '.join(f'{r:.0f}' for r in out['retrieve']['all_mb_per_s'])} MB/s"
        )
    return out
