"""The gateway over Orthanc's DIMSE side: a gateway whose only source is Orthanc over DIMSE
(`kind = "dimse"`: C-FIND to harvest, C-GET to retrieve: a frame costs a C-GET of its instance
unless cached), started while Orthanc still runs loaded with the study, and DCMTK's getscu as the
reference for a whole-study C-GET.

Rows: the C-FIND harvest (instances/s over its recorded duration), a whole-study retrieve streamed
through the gateway against getscu writing the study to disk, and frames at 8 connections (info).

The gateway keeps recently received instances in memory (128 MB): a second whole-study retrieve on
the same process may be served from that cache, not over DIMSE. So each timed retrieve runs on a
gateway process whose cache is empty: the first right after the harvest, the others on a restarted
gateway (same registry, its start-up harvest finished first). getscu runs before any gateway is
started, so nothing else uses the CPU meanwhile."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import TARGET_DIMSE_GETSCU_RATIO, TARGET_DIMSE_HARVEST, BenchError, log
from bench.fronting import recorded_harvest, wait_harvested
from bench.load import LoadResult
from bench.measure import list_instances, measure_frames, whole_study_retrieve
from bench.report import Table, verdict
from bench.servers import DIMSE_CALLERS, Server
from bench.study import Study
from peers.gateway import dimse_source, running_gateway

SOURCE = "orthanc-dimse"  # the gateway's one source; its harvest is recorded under this name
TITLE = "gateway over Orthanc DIMSE"
LOG_NAME = "gateway-dimse.log"  # every start's log, appended, in logs/ (scanned for problems)
GETSCU_AET = "GETSCU"
CONNECTIONS = 8  # the frame load's connections (one load only: each frame may be a C-GET)
RETRIEVES = 3  # whole-study retrieves (gateway) and getscu runs: the best is reported
CACHE_BYTES = 128 * 1024 * 1024  # the gateway's DIMSE instance cache (gateway/stream/dimse/source.py)
assert GETSCU_AET in DIMSE_CALLERS  # Orthanc refuses C-GET from AE titles it does not know


def getscu_cmd(orthanc: Server, study: Study, out_dir: Path) -> list[str]:
    assert orthanc.dimse is not None
    port, aet = orthanc.dimse
    return [
        "getscu",
        "-S",  # study root information model
        "-aet",
        GETSCU_AET,
        "-aec",
        aet,
        "127.0.0.1",
        str(port),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study.uid}",
        "-od",
        str(out_dir),
    ]


def time_getscu(orthanc: Server, study: Study, work: Path) -> dict[str, Any]:
    """getscu retrieving the whole study into an empty directory (every instance written to disk):
    the subprocess's wall time, best of RETRIEVES; the files are checked and deleted after each."""
    out_dir = work / "getscu"
    runs: list[float] = []
    size = 0
    try:
        for _ in range(RETRIEVES):
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            cmd = getscu_cmd(orthanc, study, out_dir)
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            runs.append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise BenchError(f"getscu exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
            files = [p for p in out_dir.iterdir() if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            if len(files) != study.n or size < study.size * 0.99:
                raise BenchError(f"getscu wrote {len(files)} files ({size} bytes), the study has {study.n}")
            log(f"dimse: getscu {runs[-1]:.2f} s ({size / 1e6 / runs[-1]:.0f} MB/s)")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"seconds": min(runs), "all_s": runs, "bytes": size, "command": " ".join(cmd)}


@contextlib.contextmanager
def dimse_gateway(orthanc: Server, work: Path, logs: Path) -> Iterator[tuple[Server, float]]:
    """A gateway on `work` (its registry kept between starts) whose one source is Orthanc over
    DIMSE; yields it with its launch time (time.time()). Its log is appended to logs/LOG_NAME."""
    assert orthanc.dimse is not None
    port, aet = orthanc.dimse
    source = dimse_source(SOURCE, port, aet, timeout=30)
    launched = time.time()
    try:
        with running_gateway(source, work, wait_for_studies=False) as url:
            http_port = urlsplit(url).port
            assert http_port is not None
            yield Server("dimse", http_port, None, work / "gateway.log"), launched
    finally:
        with contextlib.suppress(OSError), open(logs / LOG_NAME, "ab") as out:
            out.write((work / "gateway.log").read_bytes())


def measure_dimse(
    table: Table, orthanc: Server, study: Study, workdir: Path, logs: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """getscu, then the DIMSE gateway on a fresh registry: its harvest, a cold whole-study
    retrieve, the frame load; then the other cold retrieves on restarted gateways. Raw results,
    for `dimse_rows`."""
    work = workdir / "dimse"
    shutil.rmtree(work, ignore_errors=True)  # a fresh registry: the harvest must index everything
    (logs / LOG_NAME).unlink(missing_ok=True)
    out: dict[str, Any] = {}
    if shutil.which("getscu") is None:
        out["getscu"] = "getscu not found (Debian package dcmtk)"
    else:
        with table.section("dimse: getscu"):
            out["getscu"] = time_getscu(orthanc, study, work)
    retrieves: list[dict[str, Any]] = []
    wait_s = 120 + study.n * 0.1
    with dimse_gateway(orthanc, work, logs) as (server, launched):
        with table.section("dimse: harvest over DIMSE"):
            wait_harvested(server, study, timeout=wait_s)
            listed = time.time()
            out["harvest"] = {
                "recorded_s": recorded_harvest(work / "registry.db", study.n, source=SOURCE),
                "listed_after_launch_s": listed - launched,
            }
            h = out["harvest"]
            log(
                f"dimse: harvest {h['recorded_s'] or float('nan'):.2f} s (recorded), all listed "
                f"{h['listed_after_launch_s']:.2f} s after launch"
            )
        if "harvest" not in out:
            return out
        with table.section("dimse: whole-study retrieve 1"):
            retrieves.append(whole_study_retrieve(server, study))
            log(f"dimse: whole-study retrieve {retrieves[-1]['seconds']:.2f} s (cold cache)")
        instances = None
        with table.section("dimse: QIDO instance listing"):
            instances = list_instances(server, study)
        if instances is not None:
            frame_args = argparse.Namespace(**{**vars(args), "connections": [CONNECTIONS]})
            out.update(measure_frames(table, server, study, workdir, frame_args, instances))
    for attempt in range(2, RETRIEVES + 1):
        with table.section(f"dimse: whole-study retrieve {attempt} (restarted gateway)"):
            with dimse_gateway(orthanc, work, logs) as (server, launched):
                # Its start-up harvest runs again (C-FIND): let it finish before timing.
                if recorded_harvest(work / "registry.db", None, wait_s, SOURCE, since=launched) is None:
                    raise BenchError("restarted gateway: its start-up harvest was not recorded")
                retrieves.append(whole_study_retrieve(server, study))
                log(f"dimse: whole-study retrieve {retrieves[-1]['seconds']:.2f} s (cold cache)")
    if retrieves:
        out["retrieve"] = dict(min(retrieves, key=lambda r: r["seconds"]))
        out["retrieve"]["all_s"] = [r["seconds"] for r in retrieves]
    return out


def dimse_rows(
    table: Table,
    study: Study,
    args: argparse.Namespace,
    dimse: dict[str, Any] | None,
    orth: dict[str, Any] | None,
    note: str,
) -> None:
    """The DIMSE gateway's rows. `dimse` is None when it was not measured (no Orthanc): one row
    says why (`note`)."""
    if dimse is None:
        table.add(f"{TITLE} (C-FIND, C-GET)", note, note, "-", "skipped")
        return
    if "harvest" in dimse:
        h = dimse["harvest"]
        seconds = h["recorded_s"] or h["listed_after_launch_s"]
        how = "recorded" if h["recorded_s"] else "launch until listed"
        rate = study.n / seconds
        table.add(
            f"{TITLE}: C-FIND harvest over DIMSE ({study.n} inst): instances/s",
            f"{rate:.0f} inst/s ({seconds:.2f} s {how}; all listed "
            f"{h['listed_after_launch_s']:.2f} s after launch)",
            "",
            f">= {TARGET_DIMSE_HARVEST:.0f} inst/s",
            verdict(rate >= TARGET_DIMSE_HARVEST),
            instances_per_s=rate,
            **h,
        )
    getscu = dimse.get("getscu")
    if "retrieve" in dimse:
        r = dimse["retrieve"]
        runs = len(r["all_s"])
        ratio = getscu["seconds"] / r["seconds"] if isinstance(getscu, dict) else None
        if isinstance(getscu, dict):
            mb_s = getscu["bytes"] / 1e6 / getscu["seconds"]
            reference = f"getscu {getscu['seconds']:.2f} s ({mb_s:.0f} MB/s)"
        else:
            reference = getscu or "ERROR"
        table.add(
            f"{TITLE}: C-GET streaming through the gateway (cold cache, best of {runs}) "
            f"vs DCMTK getscu writing to disk (best of {RETRIEVES})",
            f"{r['seconds']:.2f} s ({r['mb_per_s']:.0f} MB/s)",
            reference,
            f">= {TARGET_DIMSE_GETSCU_RATIO:g}x (getscu s / gateway s)",
            f"{ratio:.2f}x {verdict(ratio >= TARGET_DIMSE_GETSCU_RATIO)}" if ratio else "skipped",
            gateway_retrieve=r,
            getscu=getscu,
            ratio=ratio,
        )
    key = f"frames_c{CONNECTIONS}"
    if key in dimse:
        g: LoadResult = dimse[key]
        o: LoadResult | None = (orth or {}).get(key)
        cached = "fits" if study.size <= CACHE_BYTES else "exceeds"
        table.add(
            f"{TITLE}: frames c={CONNECTIONS} ({g.requests} req, best of {args.load_repeats}; the study "
            f"{cached} the 128 MiB instance cache): frames/s, MB/s",
            f"{g.frames_per_s:.0f} f/s, {g.mb_per_s:.0f} MB/s",
            f"{o.frames_per_s:.0f} f/s, {o.mb_per_s:.0f} MB/s (its DICOMweb)" if o else "",
            "none (reported only)",
            "info",
            gateway_frames_s=g.frames_per_s,
            gateway_mb_s=g.mb_per_s,
            orthanc_dicomweb_frames_s=o.frames_per_s if o else None,
            requests=g.requests,
            gateway_runs=g.all_frames_per_s,
            study_fits_cache=study.size <= CACHE_BYTES,
        )
