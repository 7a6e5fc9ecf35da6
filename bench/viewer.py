"""What a viewer sees at scale: time to first frame for a large study against a small one, and
the viewer load profile (locust ``Radiologist``) at many concurrent users.

    python bench/viewer.py [--small 50] [--large 3000] [--rows 256] [--users 100] [--seconds 60]

Time to first frame is measured the way a viewer gets there, on a freshly started gateway (cold
caches, warm page cache): the study's series list, the first series' ``/metadata``, then the
first frame; and the first frame alone. Median of ``--repeats`` fresh starts. The target (issue
"Scale-out and load"): a 3,000-instance study within 1.2x of a 50-instance one.

The load part runs locust's ``Radiologist`` profile (``bench/locustfile.py``) headless against the
gateway serving both studies, and reports requests/s, failures and frame latency percentiles.
The gateway and locust share the machine: figures are for this machine and say so.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import machine_info  # noqa: E402
from bench.servers import gateway_server  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "viewer"
FRAME_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def make_study(root: Path, n: int, rows: int, seed: int) -> tuple[Path, str]:
    """A CT series of ``n`` instances (generated once, reused while complete)."""
    from fixtures.generate import make_ct_study

    folder = root / f"ct-{n}x{rows}-seed{seed}"
    if len(list(folder.glob("*.dcm"))) != n:
        shutil.rmtree(folder, ignore_errors=True)
        make_ct_study(folder, n_instances=n, rows=rows, cols=rows, seed=seed)
    import pydicom

    first = sorted(folder.glob("*.dcm"))[0]
    return folder, str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def write_config(path: Path, registry: Path, folders: list[Path]) -> Path:
    sources = "".join(
        f'[[sources]]\nname = "s{i}"\nkind = "filesystem"\npath = "{folder}"\n'
        for i, folder in enumerate(folders)
    )
    path.write_text(f'[registry]\nurl = "sqlite:///{registry}"\n[auth]\nopen = true\n{sources}')
    return path


def first_frame(base: str, study: str) -> dict[str, float]:
    """Seconds to the first frame along a viewer's path, and for the frame request alone."""
    with httpx.Client(base_url=base, timeout=60) as http:
        started = time.perf_counter()
        series = http.get(f"/studies/{study}/series").json()
        series_uid = series[0]["0020000E"]["Value"][0]
        metadata = http.get(f"/studies/{study}/series/{series_uid}/metadata").json()
        first = min(metadata, key=lambda item: int(item.get("00200013", {}).get("Value", [0])[0]))
        sop = first["00080018"]["Value"][0]
        frame_url = f"/studies/{study}/series/{series_uid}/instances/{sop}/frames/1"
        before_frame = time.perf_counter()
        response = http.get(frame_url, headers={"Accept": FRAME_ACCEPT})
        done = time.perf_counter()
        assert response.status_code == 200, response.text
    return {"viewer_path_s": done - started, "frame_s": done - before_frame, "metadata_items": len(metadata)}


def measure_first_frames(config: Path, logs: Path, studies: dict[str, str], repeats: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in studies}
    for attempt in range(repeats):
        for name, uid in studies.items():
            with gateway_server(config, logs, f"ttff-{name}-{attempt}") as server:
                results[name].append(first_frame(f"http://127.0.0.1:{server.port}/dicom-web", uid))
    return {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in results.items()
    }


def run_locust(base: str, users: int, seconds: int, work: Path) -> dict[str, Any]:
    prefix = work / "locust"
    command = [
        sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py")), "--headless",
        "-u", str(users), "-r", str(max(1, users // 10)), "-t", f"{seconds}s", "--host", base,
        "--only-summary", "--csv", str(prefix), "Radiologist",
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv")))
    out: dict[str, Any] = {}
    for row in rows:
        out[row["Name"]] = {
            "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "rps": float(row["Requests/s"]),
            "p50_ms": float(row["50%"]),
            "p95_ms": float(row["95%"]),
            "p99_ms": float(row["99%"]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--large", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=256, help="frame size (rows = columns)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    logs = OUT / "logs"
    logs.mkdir(exist_ok=True)
    small, small_uid = make_study(OUT, args.small, args.rows, seed=50)
    large, large_uid = make_study(OUT, args.large, args.rows, seed=51)
    registry = OUT / "registry.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{registry}{suffix}").unlink(missing_ok=True)
    config = write_config(OUT / "gateway.toml", registry, [small, large])
    subprocess.run(
        [sys.executable, "-m", "gateway", "index", "--config", str(config)], check=True, capture_output=True
    )
    studies = {f"{args.small} instances": small_uid, f"{args.large} instances": large_uid}
    ttff = measure_first_frames(config, logs, studies, args.repeats)
    small_t, large_t = (ttff[name] for name in studies)
    print(f"machine: {machine_info()}")
    print(f"time to first frame, fresh gateway, median of {args.repeats} ({args.rows}x{args.rows} frames):")
    for name, values in ttff.items():
        print(
            f"  {name:>16}: series + metadata ({values['metadata_items']:.0f} items) + frame "
            f"{values['viewer_path_s'] * 1000:.1f} ms; "
            f"the frame request alone {values['frame_s'] * 1000:.1f} ms"
        )
    ratio_path = large_t["viewer_path_s"] / small_t["viewer_path_s"]
    ratio_frame = large_t["frame_s"] / small_t["frame_s"]
    print(
        f"  ratio large/small: viewer path {ratio_path:.2f}x, frame alone {ratio_frame:.2f}x (target <= 1.2x)"
    )
    result: dict[str, Any] = {"machine": machine_info(), "ttff": ttff}
    if not args.skip_load:
        with gateway_server(config, logs, "load") as server:
            load = run_locust(f"http://127.0.0.1:{server.port}", args.users, args.seconds, OUT)
        result["load"] = load
        print(f"viewer profile, {args.users} users, {args.seconds} s (locust Radiologist, same machine):")
        for name, row in load.items():
            print(
                f"  {name:<40} {row['requests']:>7} req {row['failures']:>4} failed {row['rps']:>8.1f}/s "
                f"p50 {row['p50_ms']:.0f} ms p95 {row['p95_ms']:.0f} ms p99 {row['p99_ms']:.0f} ms"
            )
    (OUT / "last.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
