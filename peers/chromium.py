"""Headless Chromium as a peer: Debian's ``chromium`` driven by Playwright for Python.

Playwright's own browser download (``playwright install``) cannot reach its servers here, so the
distribution's browser is handed to it as ``executable_path``. The ``playwright`` package and
the ``chromium`` Debian package are both test dependencies; :func:`chromium_missing` says which
one is absent so a browser test can skip with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from peers.process import PeerError

__all__ = ["CHROMIUM_ARGS", "chromium_executable", "chromium_missing", "launch_options"]

# Debian installs a launcher script at /usr/bin/chromium that execs /usr/lib/chromium/chromium.
_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "chromium", "chromium-browser")

CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in a container, where the setuid sandbox cannot start
    "--disable-gpu",  # no GPU: WebGL falls back to SwiftShader, which cornerstone accepts
    "--disable-background-networking",  # no calls home from a test machine
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_executable() -> Path | None:
    """The Chromium to drive: ``$CHROMIUM`` if set, else Debian's, else one on ``PATH``."""
    override = os.environ.get("CHROMIUM")
    for candidate in (override,) if override else _CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return Path(found)
    return None


def chromium_missing() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; pyproject extra [test])"
    if chromium_executable() is None:
        wanted = os.environ.get("CHROMIUM") or "/usr/bin/chromium"
        return f"no Chromium at {wanted} (Debian: apt-get install chromium; or set CHROMIUM)"
    return None


def launch_options() -> dict[str, Any]:
    """Keyword arguments for ``playwright.chromium.launch()``."""
    executable = chromium_executable()
    if executable is None:
        raise PeerError(chromium_missing() or "no Chromium")
    return {"executable_path": str(executable), "headless": True, "args": list(CHROMIUM_ARGS)}
