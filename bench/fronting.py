"""The gateway fronting Orthanc over DICOMweb: a gateway whose only source is Orthanc's DICOMweb
root (`kind = "dicomweb"`), started while Orthanc still runs loaded with the study. Its first
harvest (instances/s), its study /metadata and its frame throughput, each against Orthanc's own
figures from the same run. Both servers share the CPU here: that is what fronting costs."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from bench.common import (
    JSON_ACCEPT,
    TARGET_FRONTING_FRAMES_RATIO,
    TARGET_FRONTING_METADATA_SPEEDUP,
    BenchError,
    Http,
    log,
)
from bench.load import LoadResult
from bench.measure import list_instances, measure_frames, measure_metadata
from bench.report import Table, verdict
from bench.servers import Server
from bench.study import Study
from peers.gateway import dicomweb_source, running_gateway

SOURCE = "orthanc"  # the fronting gateway's one source; its harvest is recorded under this name
TITLE = "gateway fronting Orthanc"
LOG_NAME = "gateway-fronting.log"  # copied into logs/ (scanned for problems like the other logs)


def wait_harvested(server: Server, study: Study, timeout: float) -> None:
    """Until QIDO lists every instance of the study. A cheap probe (the n-th instance exists) is
    polled so the polling steals little CPU from the harvest; then the listing itself is checked:
    `instances?limit=1000` returns all n (for n > 1000: the last page of 1000 is full)."""
    base = f"/dicom-web/studies/{quote(study.uid)}/instances?"
    probe = base + urlencode({"limit": 1, "offset": study.n - 1})
    full = base + urlencode({"limit": 1000, "offset": max(0, study.n - 1000)})
    expected = min(study.n, 1000)
    deadline = time.monotonic() + timeout
    http_ = Http(server.port)
    found = 0
    try:
        while True:
            status, body = http_.get(probe, {"Accept": JSON_ACCEPT})
            if status not in (200, 204, 404):  # 404: the study is not indexed yet
                raise BenchError(f"QIDO {probe} -> {status}: {body[:200]!r}")
            if status == 200 and json.loads(body):
                status, body = http_.get(full, {"Accept": JSON_ACCEPT})
                if status != 200:
                    raise BenchError(f"QIDO {full} -> {status}: {body[:200]!r}")
                found = len(json.loads(body))
                if found == expected:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"harvest: not every instance listed after {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        http_.close()


def recorded_harvest(
    registry: Path, expected: int | None, timeout: float = 10.0, source: str = SOURCE, since: float = 0.0
) -> float | None:
    """The harvest's own duration (finished - started, as it records its run in the registry) once
    it has indexed `expected` instances (None: any count); None if no such run shows up in time.
    The run is recorded just after the last instances are committed, so it may lag the QIDO
    listing a little. `since` (time.time()): only a run started after it counts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error):
            with contextlib.closing(sqlite3.connect(f"file:{registry}?mode=ro", uri=True)) as db:
                row = db.execute(
                    "SELECT started, finished, indexed, failed FROM sources WHERE name=?", (source,)
                ).fetchone()
            if row and row[1] is not None and row[0] >= since:
                started, finished, indexed, failed = row
                if (expected is not None and indexed != expected) or failed:
                    raise BenchError(f"harvest of {source}: {indexed} indexed, {failed} failed")
                return finished - started
        time.sleep(0.05)
    return None


def measure_fronting(
    table: Table,
    orthanc: Server,
    study: Study,
    workdir: Path,
    logs: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Start the fronting gateway on a fresh registry, time its first harvest, then its study
    /metadata and frame loads. Raw results, for `fronting_rows`; its log is copied to logs/."""
    work = workdir / "fronting"
    shutil.rmtree(work, ignore_errors=True)  # a fresh registry: the harvest must index everything
    (logs / LOG_NAME).unlink(missing_ok=True)
    out: dict[str, Any] = {}
    launched = time.perf_counter()
    try:
        with running_gateway(
            dicomweb_source(SOURCE, orthanc.dicomweb, timeout=30.0), work, wait_for_studies=False
        ) as url:
            answered = time.perf_counter()
            port = urlsplit(url).port
            assert port is not None
            server = Server("fronting", port, None, work / "gateway.log")
            with table.section("fronting: harvest over DICOMweb"):
                wait_harvested(server, study, timeout=120 + study.n * 0.1)
                listed = time.perf_counter()
                out["harvest"] = {
                    "recorded_s": recorded_harvest(work / "registry.db", study.n),
                    "listed_after_answer_s": listed - answered,
                    "listed_after_launch_s": listed - launched,
                }
                h = out["harvest"]
                log(
                    f"fronting: harvest {h['recorded_s'] or float('nan'):.2f} s (recorded), all listed "
                    f"{h['listed_after_launch_s']:.2f} s after launch"
                )
            if "harvest" not in out:
                return out
            instances = None
            with table.section("fronting: QIDO instance listing"):
                instances = list_instances(server, study)
            out.update(measure_metadata(table, server, study, args.metadata_repeats))
            if instances is not None:
                out.update(measure_frames(table, server, study, workdir, args, instances))
    finally:
        with contextlib.suppress(OSError):
            shutil.copyfile(work / "gateway.log", logs / LOG_NAME)
    return out


def fronting_rows(
    table: Table,
    study: Study,
    args: argparse.Namespace,
    front: dict[str, Any] | None,
    orth: dict[str, Any] | None,
    note: str,
) -> None:
    """The fronting gateway's rows, Orthanc's own figures (same run) beside them. `front` is None
    when it was not measured (no Orthanc): one row says why (`note`)."""
    if front is None:
        table.add(f"{TITLE} over DICOMweb", note, note, "-", "skipped")
        return
    orth = orth or {}
    if "harvest" in front:
        h = front["harvest"]
        seconds = h["recorded_s"] or h["listed_after_answer_s"]
        how = "recorded" if h["recorded_s"] else "until listed"
        table.add(
            f"{TITLE}: harvest over DICOMweb ({study.n} inst): instances/s",
            f"{study.n / seconds:.0f} inst/s ({seconds:.2f} s {how}; all listed "
            f"{h['listed_after_launch_s']:.2f} s after launch)",
            "",
            "not a target",
            "info",
            instances_per_s=study.n / seconds,
            **h,
        )
    if "metadata" in front:
        m = front["metadata"]
        other = orth.get("metadata")
        speedup = other["warm_median_ms"] / m["warm_median_ms"] if other else None
        result = f"{speedup:.1f}x {verdict(speedup >= TARGET_FRONTING_METADATA_SPEEDUP)}" if speedup else ""
        table.add(
            f"{TITLE}: study /metadata, warm median of {args.metadata_repeats} (first call)",
            f"{m['warm_median_ms']:.1f} ms ({m['first_ms']:.1f} ms)",
            f"{other['warm_median_ms']:.1f} ms ({other['first_ms']:.1f} ms)" if other else "ERROR",
            f">= {TARGET_FRONTING_METADATA_SPEEDUP:g}x faster than Orthanc",
            result or "skipped",
            gateway_ms=m["warm_median_ms"],
            gateway_first_ms=m["first_ms"],
            orthanc_ms=other["warm_median_ms"] if other else None,
            speedup=speedup,
            gateway_all_ms=m["warm_ms"],
        )
    for connections in args.connections:
        key = f"frames_c{connections}"
        if key not in front:
            continue
        g: LoadResult = front[key]
        o: LoadResult | None = orth.get(key)
        ratio = g.frames_per_s / o.frames_per_s if o else None
        table.add(
            f"{TITLE}: frames c={connections} ({g.requests} req, best of {args.load_repeats}): "
            "frames/s, MB/s",
            f"{g.frames_per_s:.0f} f/s, {g.mb_per_s:.0f} MB/s",
            f"{o.frames_per_s:.0f} f/s, {o.mb_per_s:.0f} MB/s" if o else "ERROR",
            f">= {TARGET_FRONTING_FRAMES_RATIO}x Orthanc",
            f"{ratio:.2f}x {verdict(ratio >= TARGET_FRONTING_FRAMES_RATIO)}" if ratio else "skipped",
            gateway_frames_s=g.frames_per_s,
            gateway_mb_s=g.mb_per_s,
            orthanc_frames_s=o.frames_per_s if o else None,
            ratio=ratio,
            requests=g.requests,
            gateway_runs=g.all_frames_per_s,
        )
