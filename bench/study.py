"""The benchmark study: generated with fixtures.generate.make_ct_study, or reused from the work
dir when an identical complete one is already there; and warming the page cache for it."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import CHUNK


@dataclass
class Study:
    """A study on disk and what the measurements need to know about it."""

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
    # Imported on use: pydicom and numpy are only needed here, so `--help` stays quick.
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


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file once (like `cat files > /dev/null`) so all runs see a warm page cache
    and the disk is not what we measure."""
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.read(CHUNK):
                pass
