"""Frame throughput with h2load: the URL list, the command line, parsing and checking its summary,
and the two ways of driving it (every connection walks the whole study, or each frame once)."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import FRAME_ACCEPT, BenchError
from bench.study import Study


@dataclass
class LoadResult:
    """One h2load frame load (or several run at once, summed)."""

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


def write_frame_urls(path: Path, port: int, study: Study, instances: list[tuple[str, str]]) -> Path:
    """h2load's URL list (-i): the first frame of every instance, in instance order."""
    path.write_text(
        "".join(
            f"http://127.0.0.1:{port}/dicom-web/studies/{study.uid}/series/{series}/instances/{sop}"
            f"/frames/1\n"
            for series, sop in instances
        )
    )
    return path
