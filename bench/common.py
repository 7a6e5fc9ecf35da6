"""Shared by the benchmark modules: paths, Accept headers, targets, the error type, logging,
small statistics and /proc helpers, and the keep-alive HTTP client used for timed requests."""

from __future__ import annotations

import http.client
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"  # gitignored
LAST_JSON = OUT_DIR / "last.json"

FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JSON_ACCEPT = "application/dicom+json"

# Targets (see bench/README.md).
TARGET_INDEX_PER_CORE = 600.0  # instances/s per core actually used
TARGET_METADATA_MS_PER_500 = 50.0  # warm study /metadata for 500 instances (scaled linearly)
TARGET_FRAMES_RATIO = 2.5  # gateway frames/s over Orthanc's
TARGET_RSS_RATIO = 1.1  # peak RSS streaming the ~2 GB study / the 500-instance one
TARGET_FRONTING_FRAMES_RATIO = 0.9  # gateway fronting Orthanc (DICOMweb source): frames/s over Orthanc's
TARGET_FRONTING_METADATA_SPEEDUP = 3.0  # Orthanc's warm study /metadata ms over the fronting gateway's
TARGET_DIMSE_HARVEST = 1000.0  # gateway over Orthanc's DIMSE: C-FIND harvest, instances/s
TARGET_DIMSE_GETSCU_RATIO = 1.0  # getscu's whole-study C-GET seconds over the gateway's streamed retrieve

CHUNK = 1 << 20  # read size when streaming files and response bodies


class BenchError(Exception):
    """A measurement could not be made (server down, wrong status, short response...)."""


def log(message: str) -> None:
    """Progress on stderr, so stdout carries only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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
