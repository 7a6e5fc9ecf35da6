#!/usr/bin/env python3
"""Gateway benchmark: index rate, QIDO latency, study metadata, frame throughput and peak memory,
with Orthanc (+ DICOMweb plugin) measured the same way in the same run as the reference.

Run from the repository root with the project's venv::

    .venv/bin/python bench/run.py                 # 500-instance study, gateway and Orthanc
    .venv/bin/python bench/run.py --skip-orthanc  # gateway only
    .venv/bin/python bench/run.py --big           # also the ~2 GB (4000-instance) memory check

Prints one table (each figure with its target and PASS/MISS) and writes it as JSON to
bench/out/last.json. Everything listens on 127.0.0.1 on free ports; every server the script
starts is stopped again, whatever happens. See bench/README.md.

This file is the entry point (options, and the order of the steps); the steps live beside it:
servers.py (gateway, Orthanc), study.py, measure.py (index, QIDO, metadata, loads), fronting.py
(a gateway fronting Orthanc over DICOMweb), dimse.py (a gateway over Orthanc's DIMSE, getscu),
load.py (h2load), memory.py (--big), report.py (table, JSON), common.py (shared helpers). It also
runs as ``python -m bench.run``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# `bench` and `fixtures` are not installed packages: make them importable when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import OUT_DIR, log, proc_status_kb
from bench.dimse import LOG_NAME as DIMSE_LOG
from bench.dimse import dimse_rows, measure_dimse
from bench.fronting import LOG_NAME as FRONTING_LOG
from bench.fronting import fronting_rows, measure_fronting
from bench.measure import list_instances, measure_index, measure_loads, measure_metadata, measure_qido
from bench.memory import measure_big
from bench.report import Table, comparison_rows, machine_info, publish, verdict
from bench.servers import (
    gateway_server,
    log_problems,
    orthanc_available,
    orthanc_server,
    write_gateway_config,
)
from bench.study import prepare_study


def run(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    table = Table()
    machine = machine_info()
    started = time.perf_counter()
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found (Debian: apt-get install nghttp2-client)")

    # 1. study
    log(f"generating a {args.instances}-instance 512x512 CT study in {workdir}")
    study = prepare_study(workdir, args.instances, seed=0, regenerate=args.regenerate)
    table.add(
        f"generate study ({study.n} x 512x512 16-bit, {study.size / 1e6:.0f} MB)",
        f"{study.gen_seconds:.1f} s{' (reused)' if study.reused else ''}",
        "",
        "not a target",
        "info",
        seconds=study.gen_seconds,
        reused=study.reused,
        bytes=study.size,
    )

    # 2. index
    registry = workdir / "registry.db"
    config = write_gateway_config(workdir / "gateway.toml", registry, study.directory)
    log("indexing (gateway index)")
    with table.section("index"):
        measure_index(table, config, registry, study, args.index_repeats)
    if not registry.is_file():
        print(table.render())
        return 1

    # 3-6 on the gateway
    problems: list[str] = []
    gw: dict[str, Any] = {}
    instances = None
    log("gateway: serving")
    with table.section("gateway server"):
        with gateway_server(config, logs, "main") as server:
            # Metadata first, so that its "first call" really is the server's first request.
            gw.update(measure_metadata(table, server, study, args.metadata_repeats))
            with table.section("QIDO"):
                measure_qido(table, server, study, args.qido_requests)
            with table.section("QIDO instance listing"):
                instances = list_instances(server, study)
            hwm_idle = proc_status_kb(server.pid, "VmHWM")
            if instances is not None:
                gw.update(measure_loads(table, server, study, workdir, args, instances))
            gw["rss"] = {
                "hwm_before_load_kb": hwm_idle,
                "hwm_kb": proc_status_kb(server.pid, "VmHWM"),
                "rss_kb": proc_status_kb(server.pid, "VmRSS"),
            }
    problems += log_problems(logs / "gateway-serve-main.log")

    # Orthanc, the same measurements, after the gateway is stopped (no CPU shared between them);
    # then, with Orthanc still up, a gateway fronting it over DICOMweb (sharing the CPU with it),
    # and one whose source is Orthanc over DIMSE.
    orth: dict[str, Any] | None = None
    front: dict[str, Any] | None = None
    dimse: dict[str, Any] | None = None
    orthanc_note = "skipped (--skip-orthanc)" if args.skip_orthanc else (orthanc_available() or "")
    if not orthanc_note:
        log("orthanc: starting and uploading")
        with table.section("orthanc"):
            with orthanc_server(workdir, logs, study.paths) as (server, upload_s):
                log(f"orthanc: uploaded {study.n} files in {upload_s:.1f} s")
                result = measure_metadata(table, server, study, args.metadata_repeats)
                if instances is not None:
                    result.update(measure_loads(table, server, study, workdir, args, instances))
                result["upload_s"] = upload_s
                orth = result
                log("fronting: a gateway whose source is Orthanc over DICOMweb")
                front = {}
                with table.section("gateway fronting Orthanc"):
                    front = measure_fronting(table, server, study, workdir, logs, args)
                log("dimse: a gateway whose source is Orthanc over DIMSE (C-FIND, C-GET), and getscu")
                dimse = {}
                with table.section("gateway over Orthanc DIMSE"):
                    dimse = measure_dimse(table, server, study, workdir, logs, args)
        problems += log_problems(logs / FRONTING_LOG)
        problems += log_problems(logs / DIMSE_LOG)
        if orth is None:
            orthanc_note = "ERROR"

    comparison_rows(table, study, args, gw, orth, orthanc_note)
    if "rss" in gw:
        r = gw["rss"]
        table.add(
            "gateway peak RSS (VmHWM) after frame loads + study retrieve",
            f"{r['hwm_kb'] / 1024:.0f} MiB (idle {r['hwm_before_load_kb'] / 1024:.0f} MiB)",
            "",
            "-",
            "info",
            **r,
        )
    fronting_rows(table, study, args, front, orth, orthanc_note)
    dimse_rows(table, study, args, dimse, orth, orthanc_note)

    # --big: does memory stay flat when the study is 8x larger?
    if args.big:
        log(f"--big: generating a {args.big_instances}-instance study")
        with table.section("--big"):
            problems += measure_big(table, study, config, workdir, logs, args.big_instances, args.regenerate)

    table.add(
        "gateway server log: ERROR lines / tracebacks",
        str(len(problems)),
        "",
        "0",
        verdict(not problems),
        lines=problems[:50],
    )
    elapsed = time.perf_counter() - started
    publish(table, machine, elapsed, args, study, problems)
    return 1 if any(r.result == "ERROR" for r in table.rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--instances", type=int, default=500, help="instances in the study (500)")
    parser.add_argument(
        "--big", action="store_true", help="also compare peak RSS against a ~2 GB study (--big-instances)"
    )
    parser.add_argument("--big-instances", type=int, default=4000, help="size of the --big study")
    parser.add_argument("--skip-orthanc", action="store_true", help="measure the gateway only")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=OUT_DIR / "work",
        help="studies, registries, URL lists and server logs (default bench/out/work)",
    )
    parser.add_argument(
        "--regenerate",
        action="store_true",
        help="write the studies again even if complete ones are in --workdir",
    )
    parser.add_argument(
        "--connections",
        type=int,
        nargs="+",
        default=[8, 32],
        help="h2load concurrent connections for the frame loads (8 32)",
    )
    parser.add_argument(
        "--frame-passes", type=int, default=1, help="times each connection walks every frame of the study (1)"
    )
    parser.add_argument(
        "--frame-requests",
        type=int,
        default=0,
        help="fixed h2load -n instead of connections x instances x passes",
    )
    parser.add_argument(
        "--load-repeats", type=int, default=2, help="runs of each frame load; the best is reported (2)"
    )
    parser.add_argument("--qido-requests", type=int, default=200)
    parser.add_argument("--metadata-repeats", type=int, default=10)
    parser.add_argument("--index-repeats", type=int, default=3, help="index runs per worker count (median)")
    args = parser.parse_args(argv)
    if (
        min(
            args.instances,
            args.big_instances,
            args.load_repeats,
            args.index_repeats,
            args.metadata_repeats,
            args.qido_requests,
            *args.connections,
        )
        < 1
    ):
        parser.error("counts must be positive")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
