"""The OHIF viewer under ``/viewer``, on the same origin as ``/dicom-web``.

OHIF's prebuilt ``dist/`` assumes it is served at ``/``: its ``index.html`` sets
``window.PUBLIC_URL = '/'`` and loads ``/app-config.js``, ``/app.bundle.<hash>.js`` and icons by
absolute paths, and each webpack runtime (the app bundle and its worker bundles) has the public
path ``"/"`` compiled in (``__webpack_require__.p = "/";``), from which it loads chunks, codecs
(``.wasm``) and workers; its CSS loads the icon font from ``url(/...)``. Rebuilding OHIF with
another ``PUBLIC_URL`` needs its whole Node tool chain, so these few strings are rewritten
instead (``_rewrites``) when a file is first served, and the result is kept in memory until the
file changes on disk (only the app bundle, its worker bundles, index.html and the CSS change).

``app-config.js`` is generated rather than taken from the package: one DICOMweb data source at
``<page origin>/dicom-web``. Every other path without a file answers ``index.html`` (OHIF is a
single-page app: ``/viewer/viewer?StudyInstanceUIDs=...`` is a client-side route).
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from gateway import urls
from gateway.redact import escape

__all__ = ["VIEWER_PREFIX", "CONTENT_SECURITY_POLICY", "app_config_js", "viewer_routes"]

VIEWER_PREFIX = urls.VIEWER

# What OHIF 3.12 needs, checked in Chromium (tests/viewer; CT, US, CR in native, JPEG, JPEG-LS,
# JPEG 2000 and RLE): the inline scripts of index.html; 'unsafe-eval' for ndarray's generated
# constructors (new Function) and 'wasm-unsafe-eval' for Emscripten codecs run in the page, as
# some tools do; workers from blob: URLs; thumbnails drawn as data: images; DICOMweb on this
# origin only. Without data: in img-src the study browser's thumbnails stay empty.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline' 'unsafe-eval' 'wasm-unsafe-eval' blob:",
        "worker-src 'self' blob:",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self' data: blob:",
        "object-src 'none'",
        "base-uri 'self'",
        "frame-ancestors 'self'",
    ]
)

_NO_VIEWER = (
    "no viewer is installed in {dir}: run `gateway viewer install` (with the same --config as "
    "`gateway serve`) to fetch the OHIF viewer, then reload this page\n"
)
_REWRITTEN_SUFFIXES = (".html", ".js", ".css")
# Not left to the system's mime.types: with nosniff (set by the access middleware) a script or
# style sheet of another type is refused, and WebAssembly.instantiateStreaming needs this one.
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".map": "application/json",
}
# Hashed bundles never change under their name; the rest is revalidated (ETag) on each load.
_HASHED = re.compile(r"\.[0-9a-f]{16,}\.(?:js|css|wasm)$|^[0-9a-f]{16,}\.\w+$")


def _rewrites(prefix: str) -> list[tuple[tuple[str, ...], re.Pattern[bytes], bytes]]:
    """Where OHIF's dist says "served at /", say ``prefix/`` instead (see the module docstring):
    (file suffixes, pattern, replacement)."""
    base = prefix.encode() + b"/"
    return [
        # index.html: the public URL OHIF builds its router base and library paths from
        ((".html",), re.compile(rb"window\.PUBLIC_URL = '/'"), b"window.PUBLIC_URL = '" + base + b"'"),
        # index.html: <script src="/...">, <link href="/...">, <meta content="/..."> (not "//")
        ((".html",), re.compile(rb'((?:src|href|content)=")/(?!/)'), rb"\1" + base),
        # every webpack runtime: the path chunks, workers and .wasm files are loaded from
        (
            (".js",),
            re.compile(rb'__webpack_require__\.p = "/";'),
            b'__webpack_require__.p = "' + base + b'";',
        ),
        # the app bundle: the microscopy viewer is imported by an absolute path
        ((".js",), re.compile(rb"'/dicom-microscopy-viewer/"), b"'" + base + b"dicom-microscopy-viewer/"),
        # app.bundle.css: the icon font, url(/<hash>.woff2)
        ((".css",), re.compile(rb"url\(/(?!/)"), b"url(" + base),
    ]


def app_config_js(prefix: str = VIEWER_PREFIX, dicomweb_prefix: str = urls.DICOMWEB) -> str:
    """OHIF's ``window.config``: one DICOMweb data source at the page's origin + ``dicomweb_prefix``.

    The origin is the browser's (``window.location.origin``), not one the server guesses from
    ``Host``, so the same file works behind a reverse proxy that keeps the paths."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "gateway",
        "configuration": {
            "friendlyName": "DICOMweb gateway",
            "name": "gateway",
            "qidoRoot": "",  # set below from the page's origin
            "wadoRoot": "",
            "wadoUriRoot": "",
            "qidoSupportsIncludeField": True,
            "supportsWildcard": True,
            "supportsFuzzyMatching": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            # the gateway accepts both; unquoted is what DESIGN.md saw OHIF send
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": prefix,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,  # everything is on one origin
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "gateway",
        "dataSources": [source],
    }
    return (
        "/* Generated by the DICOMweb gateway (gateway/viewer/routes.py); the package's own\n"
        "   app-config.js points at demo servers and is not served. */\n"
        f"window.config = {json.dumps(config, indent=2)};\n"
        "(function () {\n"
        f"  var root = window.location.origin + {json.dumps(dicomweb_prefix)};\n"
        "  var source = window.config.dataSources[0].configuration;\n"
        "  source.qidoRoot = source.wadoRoot = source.wadoUriRoot = root;\n"
        "})();\n"
    )


@dataclass(frozen=True)
class _Rewritten:
    stamp: tuple[int, int]  # (mtime_ns, size) of the file it was made from
    body: bytes | None  # None: the file needs no rewriting, serve it from disk
    etag: str


class ViewerApp:
    """ASGI app for everything under the prefix: files, the generated config, the SPA fallback."""

    def __init__(self, viewer_dir: Path, prefix: str, dicomweb_prefix: str, csp: bool) -> None:
        self.viewer_dir = Path(viewer_dir)
        self.prefix = prefix
        self.rewrites = _rewrites(prefix)
        self.config_js = app_config_js(prefix, dicomweb_prefix).encode()
        self.headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY} if csp else {}
        self.cache: dict[Path, _Rewritten] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # In a thread: the first request for the app bundle reads and rewrites ~15 MB, which
        # would otherwise stall the DICOMweb requests sharing the event loop.
        response = await anyio.to_thread.run_sync(self.respond, Request(scope, receive))
        await response(scope, receive, send)

    def respond(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return PlainTextResponse("the viewer is read-only\n", status_code=405, headers={"Allow": "GET"})
        root = self.viewer_dir.resolve()
        index = root / "index.html"
        if not index.is_file():
            return PlainTextResponse(_NO_VIEWER.format(dir=self.viewer_dir), status_code=404)
        rest = request.url.path.removeprefix(self.prefix).lstrip("/")
        if rest == "app-config.js":
            return self._body(request, self.config_js, "text/javascript", _etag(self.config_js))
        try:
            path = (root / rest).resolve()
            found = bool(rest) and path.is_relative_to(root) and path.is_file()
        except (OSError, ValueError):  # a NUL byte, a name too long: no such file
            found = False
        if found:
            return self._file(request, path, rest)
        # Client-side routes (/viewer/viewer?StudyInstanceUIDs=...) are the app's own page.
        # A missing asset (a name with a dot, not asked for as a page) gets a 404 instead, so a
        # broken chunk shows as such rather than as HTML parsed as JavaScript.
        last = rest.rsplit("/", 1)[-1]
        if "." in last and "text/html" not in request.headers.get("accept", ""):
            return PlainTextResponse(
                f"no file {escape(request.url.path, 256)} in the viewer\n", status_code=404
            )
        return self._file(request, index, "index.html")

    def _file(self, request: Request, path: Path, rest: str) -> Response:
        media_type = (
            _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )
        if path.suffix not in _REWRITTEN_SUFFIXES:
            return FileResponse(path, media_type=media_type, headers=self._cache_headers(rest))
        rewritten = self._rewritten(path)
        if rewritten.body is None:
            return FileResponse(path, media_type=media_type, headers=self._cache_headers(rest))
        return self._body(request, rewritten.body, media_type, rewritten.etag, rest)

    def _rewritten(self, path: Path) -> _Rewritten:
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self.cache.get(path)
        if cached is not None and cached.stamp == stamp:
            return cached
        data = path.read_bytes()
        body = data
        for suffixes, pattern, replacement in self.rewrites:
            if path.suffix in suffixes:
                body = pattern.sub(replacement, body)
        entry = _Rewritten(stamp, body if body != data else None, _etag(body))
        self.cache[path] = entry
        return entry

    def _body(self, request: Request, body: bytes, media_type: str, etag: str, rest: str = "") -> Response:
        headers = {"ETag": etag, **self._cache_headers(rest)}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    def _cache_headers(self, rest: str) -> dict[str, str]:
        name = rest.rsplit("/", 1)[-1]
        cache = "public, max-age=31536000, immutable" if _HASHED.search(name) else "no-cache"
        headers = {"Cache-Control": cache}
        if name in ("", "index.html"):
            headers.update(self.headers)  # the policy applies to the page, which loads the rest
        return headers


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha1(body, usedforsecurity=False).hexdigest() + '"'


_MAX_QUERY = 8192  # a redirect repeats the query: OHIF's are a few UIDs long


def viewer_routes(
    viewer_dir: Path,
    prefix: str = VIEWER_PREFIX,
    dicomweb_prefix: str = urls.DICOMWEB,
    csp: bool = True,
) -> list[BaseRoute]:
    """Routes serving the viewer installed at ``viewer_dir`` (by ``gateway viewer install``)
    under ``prefix``. Whether it is installed is checked per request, so installing it while the
    gateway runs needs no restart; until then the viewer's paths answer 404 saying how."""
    app = ViewerApp(viewer_dir, prefix, dicomweb_prefix, csp)

    async def bare(request: Request) -> Response:
        # OHIF's router wants the trailing slash; without a viewer, say so at once.
        if not (Path(viewer_dir) / "index.html").is_file():
            return PlainTextResponse(_NO_VIEWER.format(dir=viewer_dir), status_code=404)
        query = request.url.query
        if len(query) > _MAX_QUERY:
            return PlainTextResponse(f"query string longer than {_MAX_QUERY} characters\n", status_code=400)
        return RedirectResponse(prefix + "/" + (f"?{query}" if query else ""))

    return [Route(prefix, bare, methods=["GET", "HEAD"]), Mount(prefix, app=app)]
