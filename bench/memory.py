"""Does the gateway's memory stay flat when the study is 8x larger (--big)? The same protocol on
a fresh server for the main study and a ~2 GB one, and the ratio of their peak RSS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import TARGET_RSS_RATIO, log, proc_status_kb
from bench.load import LoadResult, frames_once_parallel, write_frame_urls
from bench.measure import list_instances, run_index, whole_study_retrieve
from bench.report import Table, verdict
from bench.servers import gateway_server, log_problems, write_gateway_config
from bench.study import Study, prepare_study, warm_page_cache

CLIENTS = 32  # concurrent clients while the study streams (the scale-out issue's condition)


@dataclass
class MemoryRun:
    """Peak RSS of one fresh gateway serving a study once (memory_protocol)."""

    hwm_start_kb: int
    hwm_kb: int
    frames: LoadResult
    retrieve: dict[str, Any]


def memory_protocol(config: Path, study: Study, workdir: Path, logs: Path, tag: str) -> MemoryRun:
    """Every frame once over ``CLIENTS`` connections, then one whole-study retrieve, on a fresh
    server; its peak RSS (VmHWM) at the end. Same protocol for both study sizes. The frame URLs are listed
    (QIDO) on a separate, short-lived server so the measured one starts from a clean heap: only
    serving the study counts, not the client's bookkeeping."""
    with gateway_server(config, logs, f"{tag}-list") as lister:
        instances = list_instances(lister, study)
    with gateway_server(config, logs, tag) as server:
        urls = write_frame_urls(workdir / f"urls-{tag}.txt", server.port, study, instances)
        hwm_start = proc_status_kb(server.pid, "VmHWM")
        frames = frames_once_parallel(urls, workdir, CLIENTS, study.frame_bytes)
        retrieve = whole_study_retrieve(server, study)
        return MemoryRun(hwm_start, proc_status_kb(server.pid, "VmHWM"), frames, retrieve)


def measure_big(
    table: Table, study: Study, config: Path, workdir: Path, logs: Path, big_instances: int, regenerate: bool
) -> list[str]:
    """Index a `big_instances` study, run the memory protocol on it and on `study` (served with
    `config`), add the rows; returns the problems found in those servers' logs."""
    big = prepare_study(workdir, big_instances, seed=1, regenerate=regenerate)
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
            f"--big: peak RSS, {st.n} inst ({st.size / 1e6:.0f} MB): "
            f"all frames once c={CLIENTS} + study retrieve",
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
    return [
        line
        for tag in ("rss-small", "rss-big", "rss-small-list", "rss-big-list")
        for line in log_problems(logs / f"gateway-serve-{tag}.log")
    ]
