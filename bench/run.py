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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

REPO = Path(__file__).resolve().parent.parent
# `fixtures` is not part of the installed package: make it importable when run as a script.
sys.path.insert(0, str(REPO))

OUT_DIR = REPO / "bench" / "out"  # gitignored
LAST_JSON = OUT_DIR / "last.json"

FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JSON_ACCEPT = "application/dicom+json"

ORTHANC_BIN = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

# Targets (see bench/README.md).
TARGET_INDEX_PER_CORE = 600.0  # instances/s per core actually used
TARGET_METADATA_MS_PER_500 = 50.0  # warm study /metadata for 500 instances (scaled linearly)
TARGET_FRAMES_RATIO = 2.5  # gateway frames/s over Orthanc's
TARGET_RSS_RATIO = 1.1  # peak RSS streaming the ~2 GB study / the 500-instance one

SOURCE_NAME = "bench"
CHUNK = 1 << 20


class BenchError(Exception):
    """A measurement could not be made (server down, wrong status, short response...)."""


# ---------------------------------------------------------------------------------------------
# Result table
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    gateway: str = ""
    orthanc: str = ""
    target: str = ""
    result: str = ""  # PASS / MISS / info / ERROR / skipped
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers for the JSON


class Table:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(
        self,
        metric: str,
        gateway: str = "",
        orthanc: str = "",
        target: str = "",
        result: str = "info",
        **data: Any,
    ) -> Row:
        row = Row(metric, gateway, orthanc, target, result, data)
        self.rows.append(row)
        return row

    def error(self, metric: str, exc: BaseException) -> None:
        self.add(metric, f"{type(exc).__name__}: {exc}"[:140], result="ERROR")

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """A failed measurement becomes an ERROR row; the remaining ones still run."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the run goes on
            print(f"  !! {name}: {exc}", file=sys.stderr)
            self.error(name, exc)

    def render(self) -> str:
        header = ("measurement", "gateway", "orthanc", "target", "result")
        cells = [header] + [(r.metric, r.gateway, r.orthanc, r.target, r.result) for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        line = "-+-".join("-" * w for w in widths)
        out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), line]
        out += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells[1:]]
        return "\n".join(out)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    # Bind to port 0 so the kernel picks a free port; it is released just before the server binds
    # it (a tiny race, acceptable on a benchmark machine).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported p95 is a latency that happened)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def proc_status_kb(pid: int, key: str) -> int:
    """VmHWM / VmRSS of a process, in kB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"{key} not in /proc/{pid}/status")


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file once (like `cat files > /dev/null`) so all runs see a warm page cache
    and the disk is not what we measure."""
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.read(CHUNK):
                pass


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["h2load"] = subprocess.run(
            ["h2load", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([ORTHANC_BIN, "--version"], capture_output=True, text=True, timeout=10)
        info["orthanc"] = out.stdout.splitlines()[0].strip() if out.stdout else ""
    return info


class Http:
    """One keep-alive HTTP/1.1 connection. http.client adds the least client-side overhead per
    request, which matters for sub-millisecond QIDO latencies."""

    def __init__(self, port: int, timeout: float = 300.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> http.client.HTTPResponse:
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                return self.conn.getresponse()
            except (
                http.client.RemoteDisconnected,
                http.client.CannotSendRequest,
                ConnectionResetError,
                BrokenPipeError,
            ):
                # The server closed an idle keep-alive connection (Orthanc: Keep-Alive timeout=1):
                # reconnect once.
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        response = self.request("GET", path, headers)
        return response.status, response.read()

    def close(self) -> None:
        self.conn.close()


def wait_http(port: int, path: str, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} before answering {path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer {path} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop one process we started: SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def log_problems(path: Path) -> list[str]:
    """ERROR lines and tracebacks a server wrote: gateway problems worth reporting."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [
        line
        for line in lines
        if " ERROR " in line or line.startswith("Traceback") or line.startswith("ERROR:")
    ]


# ---------------------------------------------------------------------------------------------
# 1. Study generation
# ---------------------------------------------------------------------------------------------


@dataclass
class Study:
    directory: Path
    paths: list[Path]
    uid: str
    patient_id: str
    study_date: str
    size: int  # bytes on disk
    frame_bytes: int  # one frame's pixel bytes
    gen_seconds: float
    reused: bool

    @property
    def n(self) -> int:
        return len(self.paths)


def prepare_study(workdir: Path, n: int, seed: int, regenerate: bool) -> Study:
    """Generate (or reuse, when an identical complete study is already in workdir) a CT study.

    The marker lives beside the study folder, not inside it, so the harvest never sees it."""
    from pydicom import dcmread

    from fixtures.generate import make_ct_study

    directory = workdir / f"ct-{n}x512x512-seed{seed}"
    marker = directory.with_suffix(".json")
    reused = False
    if not regenerate and marker.is_file() and directory.is_dir():
        info = json.loads(marker.read_text())
        paths = sorted(directory.glob("CT*.dcm"))
        if len(paths) == n and info.get("n") == n:
            gen_seconds, reused = float(info["seconds"]), True
    if not reused:
        shutil.rmtree(directory, ignore_errors=True)
        marker.unlink(missing_ok=True)
        start = time.perf_counter()
        paths = make_ct_study(directory, n_instances=n, rows=512, cols=512, seed=seed)
        gen_seconds = time.perf_counter() - start
        marker.write_text(json.dumps({"n": n, "seed": seed, "seconds": gen_seconds}))
    ds = dcmread(paths[0], stop_before_pixels=True)
    return Study(
        directory,
        paths,
        str(ds.StudyInstanceUID),
        str(ds.PatientID),
        str(ds.StudyDate),
        sum(p.stat().st_size for p in paths),
        int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8,
        gen_seconds,
        reused,
    )


# ---------------------------------------------------------------------------------------------
# 2. Index rate (gateway index CLI)
# ---------------------------------------------------------------------------------------------


def write_gateway_config(path: Path, registry: Path, study_dir: Path, port: int = 8123) -> Path:
    path.write_text(
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        "[registry]\n"
        f'url = "sqlite:///{registry}"\n'
        "[[sources]]\n"
        f'name = "{SOURCE_NAME}"\n'
        'kind = "filesystem"\n'
        f'path = "{study_dir}"\n',
        encoding="utf-8",
    )
    return path


def fresh_registry(registry: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(registry) + suffix).unlink(missing_ok=True)


@dataclass
class IndexRun:
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


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def gateway_server(config: Path, logs: Path, tag: str) -> Iterator[Server]:
    port = free_port()
    log_path = logs / f"gateway-serve-{tag}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-harvest",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        wait_http(port, "/health", proc, "gateway serve")
        yield Server("gateway", port, proc, log_path)
    finally:
        stop(proc)


def orthanc_available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else why not."""
    if not Path(ORTHANC_BIN).is_file():
        return f"{ORTHANC_BIN} not found"
    if not Path(ORTHANC_DICOMWEB).is_file():
        return f"{ORTHANC_DICOMWEB} not found"
    return None


@contextlib.contextmanager
def orthanc_server(workdir: Path, logs: Path) -> Iterator[Server]:
    """A private Orthanc: storage and index in a temp dir (deleted after), loopback only."""
    home = Path(tempfile.mkdtemp(prefix="orthanc-", dir=workdir))
    port = free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "index"),
        "HttpPort": port,
        "DicomPort": free_port(),
        "Plugins": [ORTHANC_DICOMWEB],
        "HttpCompressionEnabled": False,  # we compare raw transfer, not gzip
        "AuthenticationEnabled": False,
        "RemoteAccessAllowed": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = home / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=1))
    log_path = logs / "orthanc.log"
    try:
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [ORTHANC_BIN, str(config_path)], stdout=log_file, stderr=subprocess.STDOUT, cwd=home
            )
        try:
            wait_http(port, "/system", proc, "Orthanc")
            yield Server("orthanc", port, proc, log_path)
        finally:
            stop(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def orthanc_upload(server: Server, paths: list[Path], threads: int = 4) -> float:
    """POST every file to /instances (raw body) from a small thread pool; returns seconds."""
    local = threading.local()

    def upload(path: Path) -> None:
        if not hasattr(local, "http"):
            local.http = Http(server.port)
        response = local.http.request(
            "POST", "/instances", {"Content-Type": "application/dicom"}, path.read_bytes()
        )
        body = response.read()
        if response.status != 200 or json.loads(body).get("Status") not in ("Success", "AlreadyStored"):
            raise BenchError(f"Orthanc refused {path.name}: {response.status} {body[:200]!r}")

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(upload, paths))
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# 3. QIDO latency
# ---------------------------------------------------------------------------------------------


def qido_kinds(study: Study) -> dict[str, str]:
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
    for kind, values in times.items():
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
    table.add(
        f"QIDO all ({len(everything)} sequential): p50 / p95",
        f"{percentile(everything, 50):.1f} / {percentile(everything, 95):.1f} ms",
        "",
        "-",
        "info",
        requests=len(everything),
        p50_ms=percentile(everything, 50),
        p95_ms=percentile(everything, 95),
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


def write_frame_urls(path: Path, port: int, study: Study, instances: list[tuple[str, str]]) -> Path:
    path.write_text(
        "".join(
            f"http://127.0.0.1:{port}/dicom-web/studies/{study.uid}/series/{series}/instances/{sop}"
            f"/frames/1\n"
            for series, sop in instances
        )
    )
    return path


# ---------------------------------------------------------------------------------------------
# 4. Study metadata
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# 5. Frame throughput (h2load)
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    connections: int
    seconds: float
    data_bytes: int  # response bodies (h2load "traffic ... data")
    all_frames_per_s: list[float] = field(default_factory=list)  # every repeat, for the JSON

    @property
    def frames_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.data_bytes / 1e6 / self.seconds


_DURATION_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_h2load(output: str, requests: int, frame_bytes: int) -> tuple[float, int]:
    """Seconds and body bytes from h2load's summary, after checking every response was a 2xx
    carrying at least a frame's worth of data."""
    finished = re.search(r"finished in ([\d.]+)(s|ms|us),", output)
    done = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        output,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    traffic = re.search(r"\((\d+)\) data", output)
    if not (finished and done and codes and traffic):
        raise BenchError(f"cannot parse h2load output: {output[-600:]}")
    ok_2xx, succeeded = int(codes.group(1)), int(done.group(4))
    if ok_2xx != requests or succeeded != requests:
        raise BenchError(
            f"h2load: {ok_2xx} 2xx / {succeeded} succeeded of {requests} ({codes.group(0)}; {done.group(0)})"
        )
    data = int(traffic.group(1))
    if data < requests * frame_bytes:
        raise BenchError(f"h2load: {data} body bytes for {requests} frames of {frame_bytes} bytes")
    return float(finished.group(1)) * _DURATION_UNITS[finished.group(2)], data


def h2load_cmd(urls: Path, requests: int, connections: int) -> list[str]:
    # --h1: HTTP/1.1 (what viewers use against DICOMweb servers); -m 1: no pipelining.
    return [
        "h2load",
        "--h1",
        "-m",
        "1",
        "-i",
        str(urls),
        "-n",
        str(requests),
        "-c",
        str(connections),
        "-H",
        f"Accept: {FRAME_ACCEPT}",
    ]


def frame_load(urls: Path, requests: int, connections: int, frame_bytes: int) -> LoadResult:
    """h2load walks the URL list from the top for every connection, so `requests` =
    connections x instances makes each connection fetch every frame of the study once."""
    proc = subprocess.run(
        h2load_cmd(urls, requests, connections), capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise BenchError(f"h2load exited {proc.returncode}: {proc.stderr[-400:]}")
    seconds, data = parse_h2load(proc.stdout, requests, frame_bytes)
    return LoadResult(requests, connections, seconds, data)


def frames_once_parallel(urls: Path, workdir: Path, connections: int, frame_bytes: int) -> LoadResult:
    """Every frame exactly once, spread over `connections` connections: the list is cut into
    slices, one single-connection h2load per slice, all at once (one h2load with -c N would make
    every connection start at the top of the same list)."""
    lines = urls.read_text().splitlines()
    size = -(-len(lines) // connections)
    slices = [lines[i : i + size] for i in range(0, len(lines), size)]
    files = []
    for index, chunk in enumerate(slices):
        path = workdir / f"{urls.stem}.slice{index}.txt"
        path.write_text("\n".join(chunk) + "\n")
        files.append((path, len(chunk)))
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            h2load_cmd(path, count, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for path, count in files
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=1800)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.perf_counter() - start
    data = 0
    for (code, out, err), (_, count) in zip(outputs, files):
        if code != 0:
            raise BenchError(f"h2load exited {code}: {err[-400:]}")
        data += parse_h2load(out, count, frame_bytes)[1]
    return LoadResult(len(lines), len(files), seconds, data)


# ---------------------------------------------------------------------------------------------
# 6. Whole-study retrieve and memory
# ---------------------------------------------------------------------------------------------


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


@dataclass
class MemoryRun:
    hwm_start_kb: int
    hwm_kb: int
    frames: LoadResult
    retrieve: dict[str, Any]


def memory_protocol(config: Path, study: Study, workdir: Path, logs: Path, tag: str) -> MemoryRun:
    """Every frame once over 8 connections, then one whole-study retrieve, on a fresh server; its
    peak RSS (VmHWM) at the end. Same protocol for both study sizes. The frame URLs are listed
    (QIDO) on a separate, short-lived server so the measured one starts from a clean heap: only
    serving the study counts, not the client's bookkeeping."""
    with gateway_server(config, logs, f"{tag}-list") as lister:
        instances = list_instances(lister, study)
    with gateway_server(config, logs, tag) as server:
        urls = write_frame_urls(workdir / f"urls-{tag}.txt", server.port, study, instances)
        hwm_start = proc_status_kb(server.pid, "VmHWM")
        frames = frames_once_parallel(urls, workdir, 8, study.frame_bytes)
        retrieve = whole_study_retrieve(server, study)
        return MemoryRun(hwm_start, proc_status_kb(server.pid, "VmHWM"), frames, retrieve)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def measure_metadata(table: Table, server: Server, study: Study, repeats: int) -> dict[str, Any]:
    with table.section(f"{server.name} metadata"):
        result = time_metadata(server, study, repeats)
        log(
            f"{server.name} metadata: first {result['first_ms']:.1f} ms, warm median "
            f"{result['warm_median_ms']:.1f} ms"
        )
        return {"metadata": result}
    return {}


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


def comparison_rows(
    table: Table,
    study: Study,
    args: argparse.Namespace,
    gw: dict[str, Any],
    orth: dict[str, Any] | None,
    orthanc_note: str,
) -> None:
    def o(text: Callable[[dict[str, Any]], str], key: str) -> str:
        if orth is None:
            return orthanc_note
        return text(orth) if key in orth else "ERROR"

    target_ms = TARGET_METADATA_MS_PER_500 * study.n / 500
    if "metadata" in gw:
        m = gw["metadata"]
        table.add(
            f"study /metadata ({study.n} inst, {m['bytes'] / 1e6:.1f} MB), first call",
            f"{m['first_ms']:.1f} ms",
            o(lambda x: f"{x['metadata']['first_ms']:.1f} ms", "metadata"),
            "-",
            "info",
            gateway_ms=m["first_ms"],
            orthanc_ms=(orth or {}).get("metadata", {}).get("first_ms"),
        )
        table.add(
            f"study /metadata, warm median of {args.metadata_repeats}",
            f"{m['warm_median_ms']:.1f} ms",
            o(lambda x: f"{x['metadata']['warm_median_ms']:.1f} ms", "metadata"),
            f"<= {target_ms:.0f} ms",
            verdict(m["warm_median_ms"] <= target_ms),
            gateway_ms=m["warm_median_ms"],
            orthanc_ms=(orth or {}).get("metadata", {}).get("warm_median_ms"),
            gateway_all_ms=m["warm_ms"],
        )
    for connections in args.connections:
        key = f"frames_c{connections}"
        if key not in gw:
            continue
        g: LoadResult = gw[key]
        other: LoadResult | None = (orth or {}).get(key)
        ratio = g.frames_per_s / other.frames_per_s if other else None
        table.add(
            f"frames c={connections} ({g.requests} req = every frame x{g.requests // study.n}, "
            f"best of {args.load_repeats}): frames/s, MB/s",
            f"{g.frames_per_s:.0f} f/s, {g.mb_per_s:.0f} MB/s",
            o(lambda x, key=key: f"{x[key].frames_per_s:.0f} f/s, {x[key].mb_per_s:.0f} MB/s", key),
            f">= {TARGET_FRAMES_RATIO}x Orthanc",
            (f"{ratio:.2f}x {verdict(ratio >= TARGET_FRAMES_RATIO)}" if ratio else "skipped"),
            gateway_frames_s=g.frames_per_s,
            gateway_mb_s=g.mb_per_s,
            gateway_seconds=g.seconds,
            orthanc_frames_s=other.frames_per_s if other else None,
            orthanc_mb_s=other.mb_per_s if other else None,
            ratio=ratio,
            requests=g.requests,
            gateway_runs=g.all_frames_per_s,
            orthanc_runs=other.all_frames_per_s if other else None,
        )
    if "retrieve" in gw:
        r = gw["retrieve"]
        table.add(
            f"whole-study WADO retrieve ({r['bytes'] / 1e6:.0f} MB, streamed, best of 3)",
            f"{r['mb_per_s']:.0f} MB/s ({r['seconds']:.2f} s)",
            o(
                lambda x: f"{x['retrieve']['mb_per_s']:.0f} MB/s ({x['retrieve']['seconds']:.2f} s)",
                "retrieve",
            ),
            "-",
            "info",
            gateway_retrieve=r,
            orthanc_retrieve=(orth or {}).get("retrieve"),
        )


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

    # Orthanc, the same measurements, after the gateway is stopped (no CPU shared between them)
    orth: dict[str, Any] | None = None
    orthanc_note = "skipped (--skip-orthanc)" if args.skip_orthanc else (orthanc_available() or "")
    if not orthanc_note:
        log("orthanc: starting and uploading")
        with table.section("orthanc"):
            with orthanc_server(workdir, logs) as server:
                upload_s = orthanc_upload(server, study.paths)
                log(f"orthanc: uploaded {study.n} files in {upload_s:.1f} s")
                result = measure_metadata(table, server, study, args.metadata_repeats)
                if instances is not None:
                    result.update(measure_loads(table, server, study, workdir, args, instances))
                result["upload_s"] = upload_s
                orth = result
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

    # --big: does memory stay flat when the study is 8x larger?
    if args.big:
        log(f"--big: generating a {args.big_instances}-instance study")
        with table.section("--big"):
            big = prepare_study(workdir, args.big_instances, seed=1, regenerate=args.regenerate)
            big_registry = workdir / "registry-big.db"
            big_config = write_gateway_config(workdir / "gateway-big.toml", big_registry, big.directory)
            warm_page_cache(big.paths)
            log("--big: indexing")
            big_index = run_index(big_config, big_registry, None, big.n)
            table.add(
                f"--big: index {big.n} inst ({big.size / 1e9:.2f} GB), default workers",
                f"{big_index.rate:.0f} inst/s ({big_index.harvest_seconds:.1f} s)",
                "",
                "-",
                "info",
                instances_per_s=big_index.rate,
                harvest_s=big_index.harvest_seconds,
            )
            log("--big: memory protocol, small study")
            warm_page_cache(study.paths)
            small_run = memory_protocol(config, study, workdir, logs, "rss-small")
            log("--big: memory protocol, big study")
            warm_page_cache(big.paths)
            big_run = memory_protocol(big_config, big, workdir, logs, "rss-big")
            ratio = big_run.hwm_kb / small_run.hwm_kb
            for st, mem in ((study, small_run), (big, big_run)):
                table.add(
                    f"--big: peak RSS, {st.n} inst ({st.size / 1e6:.0f} MB): all frames once "
                    f"c=8 + study retrieve",
                    f"{mem.hwm_kb / 1024:.1f} MiB (at start {mem.hwm_start_kb / 1024:.1f}; "
                    f"{mem.frames.frames_per_s:.0f} f/s, retrieve "
                    f"{mem.retrieve['mb_per_s']:.0f} MB/s)",
                    "",
                    "-",
                    "info",
                    hwm_kb=mem.hwm_kb,
                    hwm_start_kb=mem.hwm_start_kb,
                    frames_s=mem.frames.frames_per_s,
                    retrieve=mem.retrieve,
                )
            table.add(
                f"--big: peak RSS ratio {big.n} / {study.n} instances",
                f"{ratio:.3f}",
                "",
                f"<= {TARGET_RSS_RATIO}",
                verdict(ratio <= TARGET_RSS_RATIO),
                ratio=ratio,
            )
            for tag in ("rss-small", "rss-big", "rss-small-list", "rss-big-list"):
                problems += log_problems(logs / f"gateway-serve-{tag}.log")

    table.add(
        "gateway server log: ERROR lines / tracebacks",
        str(len(problems)),
        "",
        "0",
        verdict(not problems),
        lines=problems[:50],
    )

    elapsed = time.perf_counter() - started
    print(
        f"machine: nproc={machine['nproc']}, CPU {machine['cpu_model']}, Python "
        f"{machine['python']}, {machine['date']}; {machine.get('h2load', 'h2load ?')}, "
        f"{machine.get('orthanc', 'Orthanc ?')}; run took {elapsed:.0f} s"
    )
    print(table.render())
    if problems:
        print("\ngateway log problems (first 10):\n  " + "\n  ".join(problems[:10]))

    LAST_JSON.parent.mkdir(parents=True, exist_ok=True)
    LAST_JSON.write_text(
        json.dumps(
            {
                "machine": machine,
                "elapsed_s": elapsed,
                "args": {k: str(v) for k, v in vars(args).items()},
                "study": {"instances": study.n, "bytes": study.size, "uid": study.uid},
                "rows": [
                    {
                        "metric": r.metric,
                        "gateway": r.gateway,
                        "orthanc": r.orthanc,
                        "target": r.target,
                        "result": r.result,
                        "data": r.data,
                    }
                    for r in table.rows
                ],
            },
            indent=1,
            default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o),
        )
    )
    print(f"\nJSON: {LAST_JSON}")
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
