"""The result table (one row per figure, with its target and PASS/MISS), the rows comparing the
gateway with Orthanc, the machine description, and the printed table plus bench/out/last.json."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import LAST_JSON, TARGET_FRAMES_RATIO, TARGET_METADATA_MS_PER_500
from bench.load import LoadResult
from bench.study import Study
from peers.orthanc import ORTHANC_BIN


@dataclass
class Row:
    """One line of the table; `data` keeps the raw numbers for the JSON."""

    metric: str
    gateway: str = ""
    orthanc: str = ""
    target: str = ""
    result: str = ""  # PASS / MISS / info / ERROR / skipped
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers for the JSON


class Table:
    """The rows of the one table the run prints, in the order they were measured."""

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


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores we may use, Python, h2load and Orthanc versions."""
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


def comparison_rows(
    table: Table,
    study: Study,
    args: argparse.Namespace,
    gw: dict[str, Any],
    orth: dict[str, Any] | None,
    orthanc_note: str,
) -> None:
    """Rows with the gateway's and Orthanc's results side by side; when Orthanc was not measured,
    its cell says why (`orthanc_note`)."""

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


def publish(
    table: Table,
    machine: dict[str, Any],
    elapsed: float,
    args: argparse.Namespace,
    study: Study,
    problems: list[str],
) -> None:
    """Print the machine line, the table and the first log problems; write it all as JSON."""
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
