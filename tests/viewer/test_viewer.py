"""The bundled OHIF viewer: its routes in-process (a fake dist, no browser), its installer with a
fake npm. The real viewer in a browser: ``test_browser.py``."""

from __future__ import annotations

import json
import os
import re
import stat
import tarfile
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from gateway.errors import ConfigError
from gateway.viewer.install import VERSION_FILE, install_viewer
from gateway.viewer.routes import app_config_js, viewer_routes

ROOT = Path(__file__).resolve().parent.parent.parent

# The shape of OHIF's dist/index.html and of a webpack runtime, as far as the rewriting cares.
INDEX_HTML = (
    "<!doctype html><html><head><script>window.PUBLIC_URL = '/';</script>"
    '<link rel="manifest" href="/manifest.json"/><meta name="x" content="/assets/x.png"/>'
    '<script src="/app-config.js"></script><script defer src="/app.bundle.0123456789abcdef0123.js">'
    '</script><link href="/app.bundle.css" rel="stylesheet"><a href="//example.org/">x</a></head>'
    '<body><div id="root"></div></body></html>'
)
APP_BUNDLE = 'var x = 1;\n(() => {\n\t__webpack_require__.p = "/";\n})();\n'
APP_CSS = "@font-face{src:url(/31fb9346313fc3740d7b.woff2) format('woff2')}"


def fake_dist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text(INDEX_HTML)
    (folder / "app.bundle.0123456789abcdef0123.js").write_text(APP_BUNDLE)
    (folder / "app.bundle.css").write_text(APP_CSS)
    (folder / "app-config.js").write_text("window.config = {dataSources: ['the package demo']};")
    (folder / "assets").mkdir(exist_ok=True)
    (folder / "assets" / "logo.svg").write_text("<svg/>")
    (folder / "0123456789abcdef0123.wasm").write_bytes(b"\0asm\1\0\0\0")
    return folder


def get(viewer_dir: Path, url: str, **kwargs: Any) -> httpx.Response:
    """One request to an app holding only the viewer's routes, in-process."""
    app = Starlette(routes=viewer_routes(viewer_dir))

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            return await http.get(url, **kwargs)

    return anyio.run(send)


PAGE = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}  # what a browser sends to navigate


# --- routes, in-process ---------------------------------------------------------------------------


def config_of(script: str) -> dict[str, Any]:
    match = re.search(r"window\.config = (\{.*?\n\});", script, re.S)
    assert match, script
    return json.loads(match.group(1))


def test_app_config_has_one_dicomweb_source_on_the_page_origin(tmp_path):
    response = get(fake_dist(tmp_path / "viewer"), "/viewer/app-config.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert "the package demo" not in response.text
    assert 'window.location.origin + "/dicom-web"' in response.text
    assert "source.qidoRoot = source.wadoRoot = source.wadoUriRoot = root" in response.text
    config = config_of(response.text)
    assert config["routerBasename"] == "/viewer"
    assert config["investigationalUseDialog"] == {"option": "never"}
    [source] = config["dataSources"]
    assert config["defaultDataSourceName"] == source["sourceName"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    settings = source["configuration"]
    assert settings["imageRendering"] == settings["thumbnailRendering"] == "wadors"
    assert settings["supportsWildcard"] is True
    assert settings["supportsFuzzyMatching"] is False
    assert settings["enableStudyLazyLoad"] is True
    assert "dicomUploadEnabled" not in settings


def test_app_config_follows_the_dicomweb_prefix():
    assert 'window.location.origin + "/pacs/dicom-web"' in app_config_js(dicomweb_prefix="/pacs/dicom-web")


@pytest.mark.parametrize(
    "path", ["/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2.3", "/viewer/viewer/1.2.840.3", "/viewer/x"]
)
def test_client_side_routes_answer_the_rewritten_index(tmp_path, path):
    response = get(fake_dist(tmp_path / "viewer"), path, headers=PAGE)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "window.PUBLIC_URL = '/viewer/'" in response.text
    assert "Content-Security-Policy" in response.headers


def test_index_loads_everything_under_the_prefix(tmp_path):
    html = get(fake_dist(tmp_path / "viewer"), "/viewer/index.html").text
    assert 'src="/viewer/app-config.js"' in html
    assert 'src="/viewer/app.bundle.0123456789abcdef0123.js"' in html
    assert 'href="/viewer/app.bundle.css"' in html
    assert 'href="/viewer/manifest.json"' in html
    assert 'content="/viewer/assets/x.png"' in html
    assert 'href="//example.org/"' in html  # protocol-relative: another host, left alone
    assert not re.search(r'(src|href|content)="/(?!viewer/|/)', html)


def test_bundles_load_chunks_from_under_the_prefix(tmp_path):
    response = get(fake_dist(tmp_path / "viewer"), "/viewer/app.bundle.0123456789abcdef0123.js")
    assert response.status_code == 200
    assert '__webpack_require__.p = "/viewer/";' in response.text
    assert "immutable" in response.headers["cache-control"]


def test_css_loads_fonts_from_under_the_prefix(tmp_path):
    css = get(fake_dist(tmp_path / "viewer"), "/viewer/app.bundle.css").text
    assert "url(/viewer/31fb9346313fc3740d7b.woff2)" in css


def test_rewritten_files_answer_not_modified_to_their_etag(tmp_path):
    viewer = fake_dist(tmp_path / "viewer")
    first = get(viewer, "/viewer/app.bundle.css")
    again = get(viewer, "/viewer/app.bundle.css", headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304


def test_static_files_are_served_as_they_are(tmp_path):
    response = get(fake_dist(tmp_path / "viewer"), "/viewer/assets/logo.svg")
    assert response.status_code == 200
    assert response.text == "<svg/>"
    assert response.headers["content-type"] == "image/svg+xml"


def test_codecs_are_served_as_webassembly(tmp_path):
    # instantiateStreaming refuses another type
    response = get(fake_dist(tmp_path / "viewer"), "/viewer/0123456789abcdef0123.wasm")
    assert response.headers["content-type"] == "application/wasm"
    assert response.content == b"\0asm\1\0\0\0"


def test_a_missing_asset_is_404_not_the_index(tmp_path):
    response = get(fake_dist(tmp_path / "viewer"), "/viewer/1234.bundle.abcdef0123456789abcd.js")
    assert response.status_code == 404
    assert "<html" not in response.text


def test_files_outside_the_viewer_folder_are_not_served(tmp_path):
    (tmp_path / "secret.txt").write_text("secret")
    response = get(fake_dist(tmp_path / "viewer"), "/viewer/%2E%2E/secret.txt", headers=PAGE)
    assert "secret" not in response.text


@pytest.mark.parametrize("name", ["%00", "a" * 300, "x/%00/y.js"], ids=["NUL", "too long", "NUL inside"])
def test_a_name_no_file_can_have_is_not_found_rather_than_an_error(tmp_path, name):
    response = get(fake_dist(tmp_path / "viewer"), f"/viewer/{name}.js")
    assert response.status_code == 404, response.text


def test_the_bare_prefix_does_not_repeat_a_huge_query_in_its_redirect(tmp_path):
    response = get(fake_dist(tmp_path / "viewer"), "/viewer?x=" + "a" * 10_000)
    assert response.status_code == 400 and "8192" in response.text


def test_the_bare_prefix_redirects_to_the_app(tmp_path):
    response = get(fake_dist(tmp_path / "viewer"), "/viewer")
    assert response.status_code == 307
    assert response.headers["location"].endswith("/viewer/")


@pytest.mark.parametrize("path", ["/viewer", "/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2.3"])
def test_without_a_viewer_the_operator_is_told_to_install_it(tmp_path, path):
    response = get(tmp_path / "viewer", path, headers=PAGE)
    assert response.status_code == 404
    assert "gateway viewer install" in response.text


def test_a_viewer_installed_while_serving_is_found(tmp_path):
    viewer = tmp_path / "viewer"
    assert get(viewer, "/viewer/", headers=PAGE).status_code == 404
    fake_dist(viewer)
    assert get(viewer, "/viewer/", headers=PAGE).status_code == 200


def test_the_gateway_app_serves_the_viewer_routes(client):
    # the session gateway of tests/conftest.py has no viewer in its data directory
    response = client.get("/viewer/viewer?StudyInstanceUIDs=1.2.3", headers=PAGE)
    assert response.status_code == 404
    assert "gateway viewer install" in response.text


# --- install_viewer with a fake npm --------------------------------------------------------------


def fake_npm(bin_dir: Path, tarball_from: Path | None, exit_code: int = 0) -> None:
    """An ``npm`` on PATH whose ``pack`` copies a prepared tarball (or fails)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    npm = bin_dir / "npm"
    copy = f'cp "{tarball_from}" ohif-app-test.tgz\n' if tarball_from else ""
    npm.write_text(f"#!/bin/sh\necho 'npm error 404 Not Found' >&2\n{copy}exit {exit_code}\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)


def npm_tarball(path: Path, dist: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(dist, arcname="package/dist")
        tar.add(dist / "index.html", arcname="package/README.md")
    return path


def test_install_puts_the_package_dist_at_the_target(tmp_path, monkeypatch):
    tarball = npm_tarball(tmp_path / "pack.tgz", fake_dist(tmp_path / "dist"))
    fake_npm(tmp_path / "bin", tarball)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    target = tmp_path / "data" / "viewer"
    target.mkdir(parents=True)
    (target / "stale.js").write_text("old viewer")

    assert install_viewer(target, "3.0.0") == target

    assert (target / "index.html").read_text() == INDEX_HTML
    assert (target / VERSION_FILE).read_text() == "3.0.0\n"
    assert not (target / "stale.js").exists()
    assert not (target / "README.md").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["viewer"]  # no temporary left


def test_install_without_npm_names_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="npm"):
        install_viewer(tmp_path / "viewer")


def test_install_reports_what_npm_said(tmp_path, monkeypatch):
    fake_npm(tmp_path / "bin", None, exit_code=1)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ConfigError, match="npm pack @ohif/app@.* failed.*404 Not Found"):
        install_viewer(tmp_path / "viewer")
    assert not (tmp_path / "viewer").exists()


def test_install_refuses_a_package_without_a_built_viewer(tmp_path, monkeypatch):
    tarball = tmp_path / "pack.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(fake_dist(tmp_path / "dist") / "index.html", arcname="package/index.html")
    fake_npm(tmp_path / "bin", tarball)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ConfigError, match="not a built OHIF viewer"):
        install_viewer(tmp_path / "viewer")
