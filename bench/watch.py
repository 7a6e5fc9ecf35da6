#!/usr/bin/env python3
"""How soon a study copied into a watched folder is queryable: 100 studies by default.

Run from the repository root with the project's venv::

    .venv/bin/python bench/watch.py                          # 100 studies of 5 instances
    .venv/bin/python bench/watch.py --studies 20 --background 20000

A real ``gateway serve`` (harvesting: its folder source watched, ``interval`` an hour so that
only the watcher can make a study appear) on a folder that holds ``--background`` instances
first (indexed by its start-up harvest). Then, one after another, each study is copied in the way
a PACS export or a script would: its directory made, then its files copied one by one; the clock
starts when the last file is closed, and stops when QIDO (``GET /dicom-web/instances?
StudyInstanceUID={uid}``, polled every 10 ms on one keep-alive connection) lists all its instances. Prints
p50/p95/max (goal: p95 <= 2 s) and writes them, with every latency, to bench/out/watch.json.

The studies (``fixtures.generate.make_ct_study``, 64x64 16-bit CT slices) and the background are
generated once into bench/out/watch/ and reused; the folder and registry are fresh each run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# `bench` is not an installed package: make it importable when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from bench.common import JSON_ACCEPT, OUT_DIR, REPO, BenchError, Http, log, percentile
from bench.report import machine_info
from bench.servers import SOURCE_NAME, log_problems
from fixtures.ctstudy import make_ct_study
from fixtures.model import BENCH_UID_ROOT
from peers.process import free_port, stop, wait_http

WORKDIR = OUT_DIR / "watch"
GOAL_P95 = 2.0  # seconds from the last file's close to QIDO listing every instance
_POLL = 0.01  # seconds between QIDO polls
_PER_STUDY = 30.0  # seconds a study may take before the run is declared broken
_SEED = 5000  # seeds of the studies (their UIDs derive from them), away from other benches'
_BACKGROUND_SEED = 900_000
_BACKGROUND_PER_DIR = 1000


def prepare(studies: int, instances: int, size: int, background: int) -> tuple[list[Path], Path | None]:
    """The studies' directories under WORKDIR/studies (made once) and the background folder."""
    made = []
    for index in range(studies):
        place = WORKDIR / "studies" / f"{instances}x{size}" / f"s{index:04d}"
        if len(list(place.glob("*.dcm"))) != instances:
            shutil.rmtree(place, ignore_errors=True)
            make_ct_study(place, n_instances=instances, rows=size, cols=size, seed=_SEED + index)
        made.append(place)
    if not background:
        return made, None
    back = WORKDIR / f"background-{background}"
    marker = WORKDIR / f"background-{background}.done"
    if not marker.exists():
        shutil.rmtree(back, ignore_errors=True)
        log(f"generating {background} background instances (once)")
        for start in range(0, background, _BACKGROUND_PER_DIR):
            count = min(_BACKGROUND_PER_DIR, background - start)
            make_ct_study(
                back / f"b{start // _BACKGROUND_PER_DIR:04d}",
                n_instances=count,
                rows=8,
                cols=8,
                seed=_BACKGROUND_SEED + start,
            )
        marker.write_text("ok")
    return made, back


def write_config(path: Path, folder: Path, registry: Path) -> None:
    path.write_text(
        '[server]\nhost = "127.0.0.1"\n'
        f'[registry]\nurl = "sqlite:///{registry}"\n'
        "[auth]\nopen = true\n"
        f'[[sources]]\nname = "{SOURCE_NAME}"\nkind = "filesystem"\npath = "{folder}"\n'
        "interval = 3600\nwatch = true\n",
        encoding="utf-8",
    )


def instances_listed(http: Http, uid: str) -> int:
    # A search (SQL over the index), not /studies/{uid}/instances: the access policy remembers a
    # study it found absent for 10 s (gateway/access/policy.py ``study_patient``), so polling a
    # study's own path before it lands would measure that memory, not the watcher.
    status, body = http.get(f"/dicom-web/instances?StudyInstanceUID={uid}", {"Accept": JSON_ACCEPT})
    if status == 204 or (status == 200 and not body):
        return 0
    if status != 200:
        raise BenchError(f"QIDO answered {status}: {body[:200]!r}")
    return len(orjson.loads(body))


def wait_first_harvest(log_path: Path, seconds: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if f"source {SOURCE_NAME}: seen" in log_path.read_text(errors="replace"):
            return time.monotonic() - start
        time.sleep(0.05)
    raise BenchError(f"the start-up harvest did not finish within {seconds:g} s (see {log_path})")


def run(args: argparse.Namespace) -> int:
    studies, back = prepare(args.studies, args.instances, args.size, args.background)
    run_dir = WORKDIR / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir / "folder"
    folder.mkdir(parents=True)
    if back is not None:
        log("copying the background into the folder")
        shutil.copytree(back, folder / "background")
    config = run_dir / "gateway.toml"
    write_config(config, folder, run_dir / "registry.db")
    port = free_port()
    log_path = run_dir / "gateway-serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    latencies: list[float] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, "gateway serve", str(log_path))
        startup = wait_first_harvest(log_path, 3600)
        log(f"start-up harvest done ({args.background} background instances, {startup:.1f} s after health)")
        time.sleep(1.0)  # the watcher is started beside the first harvest: let it settle
        http = Http(port, timeout=10)
        for index, source in enumerate(studies):
            uid = f"{BENCH_UID_ROOT}{_SEED + index}"
            target = folder / source.name
            target.mkdir()
            files = sorted(source.glob("*.dcm"))
            for path in files:
                shutil.copyfile(path, target / path.name)  # returns once the copy is closed
            landed = time.perf_counter()
            while instances_listed(http, uid) < len(files):
                if time.perf_counter() - landed > _PER_STUDY:
                    raise BenchError(f"study {index} not listed after {_PER_STUDY:g} s (see {log_path})")
                time.sleep(_POLL)
            latencies.append(time.perf_counter() - landed)
            if (index + 1) % 10 == 0:
                log(f"{index + 1}/{len(studies)} studies, last {latencies[-1] * 1000:.0f} ms")
        http.close()
    finally:
        stop(proc)
    p50, p95, worst = percentile(latencies, 50), percentile(latencies, 95), max(latencies)
    verdict = "PASS" if p95 <= GOAL_P95 else "MISS"
    print(
        f"{len(latencies)} studies of {args.instances} instances ({args.size}x{args.size}), "
        f"{args.background} instances already in the folder: last file closed -> QIDO lists them all"
    )
    print(
        f"p50 {p50 * 1000:.0f} ms   p95 {p95 * 1000:.0f} ms   max {worst * 1000:.0f} ms   "
        f"(goal p95 <= {GOAL_P95:g} s: {verdict})"
    )
    problems = log_problems(log_path)
    for line in problems[:10]:
        print(f"gateway log: {line}")
    (OUT_DIR / "watch.json").write_text(
        json.dumps(
            {
                "studies": len(latencies),
                "instances": args.instances,
                "size": args.size,
                "background": args.background,
                "p50_s": p50,
                "p95_s": p95,
                "max_s": worst,
                "latencies_s": latencies,
                "machine": machine_info(),
                "log_problems": problems,
            },
            indent=2,
        )
    )
    return 0 if verdict == "PASS" and not problems else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--studies", type=int, default=100, help="studies copied in, one after another")
    parser.add_argument("--instances", type=int, default=5, help="instances per study")
    parser.add_argument("--size", type=int, default=64, help="rows and columns of each slice")
    parser.add_argument("--background", type=int, default=0, help="instances in the folder before the run")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench/watch.py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
