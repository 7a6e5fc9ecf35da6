#!/usr/bin/env python3
"""A viewer opening a prior held on a DIMSE PACS: cold, and after the gateway prefetched it.

Run from the repository root with the project's venv::

    .venv/bin/python bench/prefetch.py                       # a 100 x 512x512 CT prior (~52 MB)
    .venv/bin/python bench/prefetch.py --instances 300 --phases cold prefetch

The PACS is DCMTK's dcmqrscp on loopback (``peers.dcmtk``: C-FIND, C-GET, 16 KiB PDUs) holding
the prior, one CT series. Each phase runs a fresh ``gateway serve`` (``peers.gateway``, fresh
SQLite registry, empty instance cache) with two sources: the PACS over DIMSE (C-FIND harvest,
C-GET retrieve) and an empty watched folder.

* ``cold``: the PACS source without prefetch. Once its harvest lists the prior, a viewer opens
  it as OHIF does: the series' ``/metadata`` (one request), then every frame
  (``.../instances/{i}/frames/1``, ``--connections`` at once, as a browser's six per host).
* ``prefetch``: the PACS source with ``prefetch = true``. A new study of the same patient (2
  instances) is copied into the watched folder; the announcer makes it ``study.available``, and
  the prefetch retrieves the prior. The clock of "prefetch" runs from the copy's end to the
  gateway's log line for the prior (announcement quiet period included); then the same viewer.

Prints each phase's figures and writes them to bench/out/prefetch.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

# `bench` is not an installed package: make it importable when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
import pydicom

from bench.common import FRAME_ACCEPT, JSON_ACCEPT, OUT_DIR, BenchError, Http, log
from bench.report import machine_info
from bench.servers import log_problems
from fixtures.ctstudy import make_ct_study
from fixtures.model import BENCH_UID_ROOT
from peers.dcmtk import dcmtk_missing, running_dcmqrscp
from peers.gateway import dimse_source, folder_source, running_gateway

WORKDIR = OUT_DIR / "prefetch"
_SEED = 7100  # the patient (PatientID BENCH-7100): both studies share it, and so are one patient
PRIOR_UID = f"{BENCH_UID_ROOT}7100.1"
NEW_UID = f"{BENCH_UID_ROOT}7100.2"
_PREFETCH_WAIT = 300.0  # seconds the prefetch may take before the run is declared broken


def prepare(instances: int, size: int) -> tuple[list[Path], Path]:
    """The prior's files (made once per shape) and the new study's folder."""
    prior = WORKDIR / f"prior-{instances}x{size}"
    if len(list(prior.glob("*.dcm"))) != instances:
        shutil.rmtree(prior, ignore_errors=True)
        log(f"generating the prior: {instances} x {size}x{size}")
        make_ct_study(prior, n_instances=instances, rows=size, cols=size, seed=_SEED, study_uid=PRIOR_UID)
    new = WORKDIR / "new"
    if len(list(new.glob("*.dcm"))) != 2:
        shutil.rmtree(new, ignore_errors=True)
        make_ct_study(new, n_instances=2, rows=64, cols=64, seed=_SEED, study_uid=NEW_UID)
    return sorted(prior.glob("*.dcm")), new


def series_instances(http: Http, study: str, expected: int) -> tuple[str, list[str]]:
    """The prior's (one) series and its instances, from QIDO (what C-FIND gave the index), once
    the start-up harvest has listed all ``expected`` of them."""
    deadline = time.monotonic() + 120
    while True:
        query = f"/dicom-web/instances?StudyInstanceUID={study}&limit=10000"
        status, body = http.get(query, {"Accept": JSON_ACCEPT})
        if status not in (200, 204):
            raise BenchError(f"QIDO answered {status}: {body[:200]!r}")
        rows = orjson.loads(body) if body else []
        if len(rows) >= expected:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"the harvest listed {len(rows)} of {expected} instances in 120 s")
        time.sleep(0.1)
    series = {row["0020000E"]["Value"][0] for row in rows}
    if len(series) != 1:
        raise BenchError(f"expected one series, found {len(series)}")
    return series.pop(), [row["00080018"]["Value"][0] for row in rows]


def open_like_a_viewer(port: int, study: str, connections: int) -> dict[str, Any]:
    """The series' /metadata, then every frame over ``connections`` keep-alive connections."""
    http = Http(port)
    series, instances = series_instances(http, study, 1)
    base = f"/dicom-web/studies/{study}/series/{series}"
    start = time.perf_counter()
    status, body = http.get(f"{base}/metadata", {"Accept": JSON_ACCEPT})
    metadata_s = time.perf_counter() - start
    if status != 200:
        raise BenchError(f"/metadata answered {status}: {body[:200]!r}")
    described = orjson.loads(body)
    complete = sum(1 for item in described if "00280010" in item)  # Rows: not in a C-FIND answer
    http.close()

    chunks = [instances[i::connections] for i in range(connections)]
    firsts: list[float] = []

    def frames(uids: list[str]) -> int:
        client = Http(port)
        got = 0
        try:
            for uid in uids:
                status, body = client.get(f"{base}/instances/{uid}/frames/1", {"Accept": FRAME_ACCEPT})
                if status != 200:
                    raise BenchError(f"frame of {uid} answered {status}: {body[:200]!r}")
                if not firsts:
                    firsts.append(time.perf_counter() - frames_start)
                got += len(body)
        finally:
            client.close()
        return got

    frames_start = time.perf_counter()
    with ThreadPoolExecutor(connections) as pool:
        received = sum(pool.map(frames, chunks))
    frames_s = time.perf_counter() - frames_start
    return {
        "instances": len(instances),
        "metadata_s": round(metadata_s, 3),
        "metadata_items_with_rows": complete,
        "first_frame_s": round(firsts[0], 3) if firsts else None,
        "all_frames_s": round(frames_s, 3),
        "viewer_total_s": round(metadata_s + frames_s, 3),
        "frame_mb": round(received / 1e6, 1),
    }


def wait_prefetched(log_path: Path, study: str, since: int) -> str:
    """The gateway's log line saying the prior was prefetched (written after ``since`` bytes)."""
    deadline = time.monotonic() + _PREFETCH_WAIT
    while time.monotonic() < deadline:
        text = log_path.read_bytes()[since:].decode(errors="replace")
        for line in text.splitlines():
            if "prefetch:" in line and study in line:
                if "failed" in line:
                    raise BenchError(f"prefetch failed: {line}")
                return line
        time.sleep(0.02)
    raise BenchError(f"no prefetch of {study} within {_PREFETCH_WAIT:g} s (see {log_path})")


def phase(name: str, args: argparse.Namespace, pacs_port: int, pacs_aet: str, new: Path) -> dict[str, Any]:
    work = WORKDIR / "run" / name
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "folder"
    folder.mkdir(parents=True)
    source = dimse_source("pacs", pacs_port, pacs_aet, timeout=30)
    if name == "prefetch":
        source += "prefetch = true\n"
    sources = source + folder_source("inbox", folder, priority=1)
    if name == "prefetch":
        sources += f"[prefetch]\npriors = 2\nmax_instances = {args.instances}\n"
    result: dict[str, Any] = {}
    with running_gateway(sources, work) as url:
        port = int(url.split(":")[2].split("/")[0])
        log_path = work / "gateway.log"
        http = Http(port)
        series_instances(http, PRIOR_UID, args.instances)  # the start-up harvest has listed it all
        http.close()
        if name == "prefetch":
            since = log_path.stat().st_size
            # A new study is dated today ([prefetch] within_days): copied in with that date.
            today = date.today().strftime("%Y%m%d")
            (folder / "new").mkdir()
            for path in sorted(new.glob("*.dcm")):
                ds = pydicom.dcmread(path)
                ds.StudyDate = today
                ds.save_as(folder / "new" / path.name)
            copied = time.perf_counter()
            line = wait_prefetched(log_path, PRIOR_UID, since)
            result["prefetch_s"] = round(time.perf_counter() - copied, 3)
            result["prefetch_log"] = line.split("gateway.prefetch: ", 1)[-1]
            log(f"prefetched {result['prefetch_s']:.2f} s after the copy: {result['prefetch_log']}")
        result |= open_like_a_viewer(port, PRIOR_UID, args.connections)
        result["problems"] = log_problems(log_path)
    log(f"{name}: {result}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=100, help="instances of the prior (one series)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each 16-bit slice")
    parser.add_argument("--connections", type=int, default=6, help="the viewer's concurrent frame requests")
    parser.add_argument("--phases", nargs="+", default=["cold", "prefetch"], choices=["cold", "prefetch"])
    args = parser.parse_args(argv)
    missing = dcmtk_missing()
    if missing:
        raise BenchError(missing)
    prior, new = prepare(args.instances, args.size)
    results: dict[str, Any] = {
        "conditions": {
            "pacs": "DCMTK dcmqrscp on loopback, C-GET, MaxPDUSize 16384",
            "prior": f"{args.instances} x {args.size}x{args.size} 16-bit CT, one series, "
            f"{sum(p.stat().st_size for p in prior) / 1e6:.0f} MB",
            "viewer": f"series /metadata, then frame 1 of every instance over {args.connections} connections",
            "machine": machine_info(),
        }
    }
    shutil.rmtree(WORKDIR / "dcmqrscp", ignore_errors=True)
    with running_dcmqrscp(WORKDIR / "dcmqrscp", prior) as pacs:
        try:
            for name in args.phases:
                results[name] = phase(name, args, pacs.port, pacs.aet, new)
        finally:
            shutil.rmtree(WORKDIR / "dcmqrscp", ignore_errors=True)
    keys = ("prefetch_s", "metadata_s", "metadata_items_with_rows", "first_frame_s", "all_frames_s")
    print(f"{'phase':<10}" + "".join(f"{key:>26}" for key in keys))
    for name in args.phases:
        print(f"{name:<10}" + "".join(f"{str(results[name].get(key, '-')):>26}" for key in keys))
    out = OUT_DIR / "prefetch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    log(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
