"""The real OHIF viewer in headless Chromium: fixtures (the viewer installed once with npm into
``.cache/viewer-<version>``, Debian's Chromium driven by Playwright, a small CT study, a gateway
serving both) and ``open_viewer_and_check``, which opens a page and reports what the viewer
fetched and drew. Each fixture skips with its reason when what it needs is missing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from fixtures.generate import make_ct_study
from gateway.errors import ConfigError
from gateway.viewer.install import OHIF_VERSION, install_viewer
from peers.chromium import chromium_missing, launch_options
from peers.gateway import folder_source, running_gateway

__all__ = ["open_viewer_and_check", "canvas_is_nonblank", "viewer_cache"]

ROOT = Path(__file__).resolve().parent.parent.parent


CANVAS_STATS = """() => {
  // The viewport's 2D canvas (cornerstone draws the rendered image into it; annotations and
  // overlays are DOM and SVG above it), copied so a WebGL canvas would be readable too.
  const stats = [];
  for (const canvas of document.querySelectorAll('canvas.cornerstone-canvas')) {
    if (!canvas.width || !canvas.height) continue;
    const copy = document.createElement('canvas');
    copy.width = canvas.width;
    copy.height = canvas.height;
    const context = copy.getContext('2d');
    context.drawImage(canvas, 0, 0);
    const data = context.getImageData(0, 0, copy.width, copy.height).data;
    const levels = new Set();
    let min = 255, max = 0;
    for (let i = 0; i < data.length; i += 4) {
      const value = data[i + 1];  // green: grey images have R = G = B
      levels.add(value);
      if (value < min) min = value;
      if (value > max) max = value;
    }
    stats.push({width: copy.width, height: copy.height, levels: levels.size, min, max});
  }
  return stats;
}"""

CSP_WATCH = """if (!window.__cspViolations) {
  window.__cspViolations = [];
  document.addEventListener('securitypolicyviolation',
    e => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));
}"""


def canvas_is_nonblank(stats: dict[str, int] | None) -> bool:
    """An image, not a cleared viewport: several grey levels spanning a visible range."""
    return bool(stats) and stats["levels"] >= 3 and stats["max"] - stats["min"] >= 64  # type: ignore[index]


def open_viewer_and_check(page: Any, url: str, timeout: float = 60.0) -> dict[str, Any]:
    """Open ``url`` (a viewer page, or a link that redirects to one) in a Playwright ``page`` and
    poll until the viewer fetched series metadata and a frame and drew a non-blank image, or
    until ``timeout`` seconds. Returns what it saw, for the caller to assert on:

    ``final_url``, ``metadata`` and ``frames`` (``[(status, url)]`` of those DICOMweb requests),
    ``failed`` (every response >= 400), ``canvas`` (grey-level stats of the viewport canvas),
    ``canvas_nonblank``, ``csp_violations``, ``page_errors``, ``console_errors``, ``seconds``."""
    responses: list[tuple[int, str]] = []
    page_errors: list[str] = []
    console_errors: list[str] = []

    def on_response(response: Any) -> None:
        responses.append((response.status, response.url))

    def on_page_error(error: Any) -> None:
        page_errors.append(str(error))

    def on_console(message: Any) -> None:
        if message.type == "error":
            console_errors.append(message.text[:500])

    page.on("response", on_response)
    page.on("pageerror", on_page_error)
    page.on("console", on_console)
    page.add_init_script(CSP_WATCH)
    started = time.monotonic()
    deadline = started + timeout
    canvas: dict[str, int] | None = None
    metadata: list[tuple[int, str]] = []
    frames: list[tuple[int, str]] = []
    violations: list[str] = []
    try:
        page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
        while True:
            metadata = [r for r in responses if "/dicom-web/" in r[1] and r[1].endswith("/metadata")]
            frames = [r for r in responses if "/dicom-web/" in r[1] and "/frames/" in r[1]]
            if any(s == 200 for s, _ in metadata) and any(s == 200 for s, _ in frames):
                stats = page.evaluate(CANVAS_STATS)
                canvas = max(stats, key=lambda s: s["levels"]) if stats else None
                if canvas_is_nonblank(canvas):
                    break
            if time.monotonic() > deadline:
                break
            # Polling, not sleeping: the sync API delivers the page's events only during calls.
            page.wait_for_timeout(200)
        violations = page.evaluate("window.__cspViolations || []")
    finally:
        page.remove_listener("response", on_response)
        page.remove_listener("pageerror", on_page_error)
        page.remove_listener("console", on_console)
    # An image made with new Image() outside the document reports its CSP violation only on
    # the console, not as an event the page can see.
    violations += [m for m in console_errors if "Content Security Policy" in m]
    return {
        "final_url": page.url,
        "metadata": metadata,
        "frames": frames,
        "failed": [r for r in responses if r[0] >= 400],
        "canvas": canvas,
        "canvas_nonblank": canvas_is_nonblank(canvas),
        "csp_violations": violations,
        "page_errors": page_errors,
        "console_errors": console_errors,
        "seconds": round(time.monotonic() - started, 2),
    }


def viewer_cache(version: str = OHIF_VERSION) -> Path:
    """Where the tests keep the viewer between runs (git-ignored: ``/.cache/``)."""
    return ROOT / ".cache" / f"viewer-{version}"


@pytest.fixture(scope="session")
def installed_viewer() -> Path:
    """The real OHIF viewer, fetched with npm on the first run only."""
    cache = viewer_cache()
    if not (cache / "index.html").is_file():
        try:
            install_viewer(cache)
        except ConfigError as exc:
            pytest.skip(f"the OHIF viewer could not be installed: {exc.message}")
    return cache


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope, not session: Playwright's sync API keeps an event loop running in this thread
    # while it is open, and the in-process tests' anyio.run() refuses to start inside one.
    missing = chromium_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(**launch_options())
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small CT series (5 slices of 64x64) in a folder, and its StudyInstanceUID."""
    folder = tmp_path_factory.mktemp("ct")
    paths = make_ct_study(folder, n_instances=5, rows=64, cols=64, seed=7)
    ds = pydicom.dcmread(paths[0])
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # Air, soft tissue and bone: contrast the viewer's default window (40/400) shows.
    assert hu.min() < -200 and hu.max() > 240, "the fixture CT must have visible contrast"
    return folder, str(ds.StudyInstanceUID)


@pytest.fixture(scope="module")
def viewer_gateway(
    ct_study: tuple[Path, str], installed_viewer: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``gateway serve`` (open access) on the CT study, with the viewer in its data directory
    (beside registry.db); yields the origin, e.g. ``http://127.0.0.1:PORT``."""
    work = tmp_path_factory.mktemp("viewer-gateway")
    (work / "viewer").symlink_to(installed_viewer, target_is_directory=True)
    with running_gateway(folder_source("ct", ct_study[0]), work) as url:
        yield url.removesuffix("/dicom-web")
