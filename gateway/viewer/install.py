"""``gateway viewer install``: the prebuilt OHIF viewer from the npm package ``@ohif/app``.

The package's ``dist/`` folder is the whole built viewer (HTML, bundles, codecs as WebAssembly),
so installing needs npm to fetch the tarball and nothing to build: ``npm pack`` downloads it
without installing dependencies, and only ``package/dist/`` is kept.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from gateway.errors import ConfigError

__all__ = ["OHIF_VERSION", "VERSION_FILE", "install_viewer"]

# The viewer the gateway is tested with (tests/viewer): DESIGN.md's wire notes are from 3.12.
OHIF_VERSION = "3.12.0"
PACKAGE = "@ohif/app"
VERSION_FILE = ".ohif-version"  # written into the installed folder: which release it holds


def install_viewer(target: Path, version: str = OHIF_VERSION, timeout: float = 600.0) -> Path:
    """Fetch ``@ohif/app@version`` with npm and put its ``dist/`` at ``target`` (replacing what
    was there); returns ``target``. Raises ``ConfigError`` when npm is missing or fails."""
    target = Path(target).absolute()
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError(
            f"installing the viewer needs npm (Node.js) to fetch {PACKAGE}: "
            "install it (Debian: apt-get install npm) and run `gateway viewer install` again"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Work beside the target so the final rename stays on one filesystem (atomic).
        with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as work:
            tarball = _npm_pack(npm, f"{PACKAGE}@{version}", Path(work), timeout)
            dist = _extract_dist(tarball, Path(work) / "extracted")
            (dist / VERSION_FILE).write_text(version + "\n")
            _replace(dist, target, Path(work))
    except OSError as exc:
        raise ConfigError(f"cannot install the viewer into {target}: {exc}") from exc
    return target


def _npm_pack(npm: str, spec: str, work: Path, timeout: float) -> Path:
    """``npm pack`` downloads the package's tarball into ``work`` without running any script."""
    try:
        done = subprocess.run(
            [npm, "pack", spec, "--loglevel=error", "--ignore-scripts"],  # errors only, not notices
            cwd=work,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"npm pack {spec} did not finish within {timeout:.0f} s") from exc
    except OSError as exc:
        raise ConfigError(f"cannot run npm ({npm}): {exc}") from exc
    tarballs = sorted(work.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        detail = (done.stderr or done.stdout).strip()[-2000:]
        raise ConfigError(f"npm pack {spec} failed (exit {done.returncode}): {detail}")
    return tarballs[0]


def _extract_dist(tarball: Path, into: Path) -> Path:
    """Unpack the tarball's ``package/dist/``; the "data" filter refuses links and paths that
    would escape ``into``, whatever the tarball holds."""
    try:
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(into, members=members, filter="data")
    except tarfile.TarError as exc:
        raise ConfigError(f"{tarball.name} is not a readable npm tarball: {exc}") from exc
    dist = into / "package" / "dist"
    if not (dist / "index.html").is_file():
        raise ConfigError(f"{tarball.name} has no package/dist/index.html: not a built OHIF viewer")
    return dist


def _replace(new: Path, target: Path, work: Path) -> None:
    """Move ``new`` to ``target``. A directory cannot be renamed over a non-empty one, so the old
    viewer is first moved aside: a server reading the folder sees the old or the new viewer,
    missing only between two renames."""
    if target.exists() or target.is_symlink():
        old = work / "previous"
        target.rename(old)  # removed with the work directory
    new.rename(target)
