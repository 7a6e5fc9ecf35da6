"""Upstreams are origins, and their answers are bounded: a DICOMweb source against real hostile
servers on loopback. One hands out BulkDataURIs on another origin or above its base path, one
redirects, one trickles, one floods, one ignores paging. The gateway runs in-process (harvest
called directly, requests through the ASGI app); the upstreams are real HTTP servers in threads.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import orjson
import pytest

from gateway.app import create_app
from gateway.config import AuthConfig, Config, Deadlines, ServerConfig, SourceConfig
from gateway.errors import SourceError, SourceTimeout
from gateway.service import Gateway
from gateway.stream import dicomweb_pacs as dicomweb
from gateway.stream.origin import OffOrigin, Origin

SECRET = "Bearer upstream-only-secret"
STUDY, SERIES, SOP = (
    "1.2.826.0.1.3680043.8.498.11",
    "1.2.826.0.1.3680043.8.498.12",
    "1.2.826.0.1.3680043.8.498.13",
)
INSTANCE = f"/studies/{STUDY}/series/{SERIES}/instances/{SOP}"
OCTETS = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
DICOM = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
OTHERS_BYTES = b"BYTES-OF-ANOTHER-SERVICE"


# -- the origin policy alone (no I/O) --------------------------------------------------------------

BASE = "http://127.0.0.1:8042/dicom-web"
METADATA = f"{BASE}/studies/1/series/2/metadata"
REFERENCES = [
    # (reference found in metadata, what it becomes, or the reason it is refused)
    ("absolute-in-base", f"{BASE}/studies/1/bulk/x", f"{BASE}/studies/1/bulk/x"),
    ("relative", "bulk/x?a=1#frag", f"{BASE}/studies/1/series/2/bulk/x?a=1"),
    ("relative-up-in-base", "../../other", f"{BASE}/studies/1/other"),
    ("path-absolute", "/dicom-web/studies/1/bulk/x", f"{BASE}/studies/1/bulk/x"),
    ("scheme-case", "HTTP://127.0.0.1:8042/dicom-web/x", f"{BASE}/x"),
    ("dots-in-absolute", f"{BASE}/a/../b", f"{BASE}/b"),
    ("other-port", "http://127.0.0.1:9999/dicom-web/x", "leaves the source's origin"),
    ("other-host", "//evil.test/dicom-web/x", "leaves the source's origin"),
    ("other-scheme", "https://127.0.0.1:8042/dicom-web/x", "leaves the source's origin"),
    ("not-http", "file:///etc/passwd", "is not an http(s) URL"),
    ("climbs-out", "../../../../../other", "outside the source's base path"),
    ("path-absolute-out", "/other", "outside the source's base path"),
    ("dots-in-absolute-out", f"{BASE}/../admin", "outside the source's base path"),
    ("prefix-not-segment", "http://127.0.0.1:8042/dicom-webby/x", "outside the source's base path"),
    ("encoded-dots", "%2e%2e/%2E%2E/%2e%2e/%2e%2e/x", "hides a dot or a separator"),
    ("encoded-slash", "a%2fb", "hides a dot or a separator"),
    ("backslash", "..\\..\\x", "hides a dot or a separator"),
    ("dot-params", "..;/..;/x", "dot segment with parameters"),
    ("credentials", "http://user:pw@127.0.0.1:8042/dicom-web/x", "carries other credentials"),
    ("userinfo-host-trick", "http://127.0.0.1:8042@evil.test/dicom-web/x", "leaves the source's origin"),
    ("bad-port", "http://127.0.0.1:99999/dicom-web/x", "is malformed"),
]


@pytest.mark.parametrize(
    ("reference", "expected"), [r[1:] for r in REFERENCES], ids=[r[0] for r in REFERENCES]
)
def test_upstream_urls_are_resolved_against_the_response_and_kept_under_the_base_url(reference, expected):
    origin = Origin("pacs", BASE)
    joined = origin.join(reference, METADATA)
    if expected.startswith("http"):
        assert origin.check(joined, "BulkDataURI") == expected
    else:
        with pytest.raises(OffOrigin) as refused:
            origin.check(joined, "BulkDataURI")
        assert expected in refused.value.message and refused.value.message.startswith("source pacs:")
        assert "user:pw" not in refused.value.message  # user info is never quoted back


# -- real upstreams on loopback --------------------------------------------------------------------


@dataclass
class Peer:
    """A loopback HTTP server that records every request (path and Authorization header)."""

    url: str
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    notes: dict[str, Any] = field(default_factory=dict)

    def paths(self, needle: str = "") -> list[str]:
        return [path for path, _ in self.seen if needle in path]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server: Any = self.server
        server.peer.seen.append((self.path, self.headers.get("Authorization")))
        server.peer.notes["accept-encoding"] = self.headers.get("Accept-Encoding")
        server.respond(self, server.peer)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(respond: Callable[[http.server.BaseHTTPRequestHandler, Peer], None]) -> Iterator[Peer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    peer = Peer(f"http://127.0.0.1:{server.server_address[1]}")
    server.peer, server.respond = peer, respond  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield peer
    finally:
        peer.stop.set()  # trickling handlers end
        server.shutdown()
        server.server_close()


def send(handler: Any, status: int, body: bytes, content_type: str, **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def send_json(handler: Any, value: Any) -> None:
    send(handler, 200, orjson.dumps(value), "application/dicom+json")


def send_part(handler: Any, data: bytes) -> None:
    body = b"--b\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--b--\r\n"
    send(handler, 200, body, 'multipart/related; type="application/octet-stream"; boundary=b')


def uid_item(tag: str, uid: str) -> dict[str, Any]:
    return {tag: {"vr": "UI", "Value": [uid]}}


def instance_json(study: str, series: str, sop: str, bulk: str) -> dict[str, Any]:
    return {
        "00020010": {"vr": "UI", "Value": ["1.2.840.10008.1.2.1"]},
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
        "00080018": {"vr": "UI", "Value": [sop]},
        "00080020": {"vr": "DA", "Value": ["20240102"]},
        "00080060": {"vr": "CS", "Value": ["OT"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Upstream^Test"}]},
        "00100020": {"vr": "LO", "Value": ["UP-1"]},
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [series]},
        "00280010": {"vr": "US", "Value": [2]},
        "00280011": {"vr": "US", "Value": [2]},
        "00280100": {"vr": "US", "Value": [8]},
        "00281201": {"vr": "OW", "BulkDataURI": bulk},  # Red Palette Color LUT Data: bulk data
    }


def pacs(bulk: str, retrieve: Callable[[Any, Peer], None] | None = None) -> Callable[[Any, Peer], None]:
    """A DICOMweb service under /dicom-web holding one instance whose metadata carries ``bulk``;
    retrievals (frames, instance, bulk) go to ``retrieve``, else get a small part."""

    def respond(handler: Any, peer: Peer) -> None:
        path = urlsplit(handler.path).path.removeprefix("/dicom-web")
        if path == "/studies":
            send_json(handler, [uid_item("0020000D", STUDY)])
        elif path == f"/studies/{STUDY}/series":
            send_json(handler, [uid_item("0020000E", SERIES)])
        elif path == f"/studies/{STUDY}/series/{SERIES}/metadata":
            send_json(handler, [instance_json(STUDY, SERIES, SOP, bulk)])
        elif path.startswith(INSTANCE) and retrieve is not None:
            retrieve(handler, peer)
        elif path.startswith(INSTANCE):
            send_part(handler, b"\x00\x01\x02\x03")
        else:
            send(handler, 404, b"not here", "text/plain")

    return respond


def another_service(handler: Any, peer: Peer) -> None:
    send_part(handler, OTHERS_BYTES)


@dataclass
class Front:
    """The gateway under test, in-process, with one DICOMweb source "pacs"."""

    gateway: Gateway

    def harvest(self) -> Any:
        return self.gateway.harvest("pacs")

    def get(self, path: str, headers: dict[str, str]) -> httpx.Response:
        app = create_app(self.gateway)

        async def send() -> httpx.Response:
            try:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
                    return await http.get("/dicom-web" + path, headers=headers)
            finally:  # the source's aiohttp session belongs to this event loop
                for source in self.gateway.sources.values():
                    await source.aclose()

        return anyio.run(send)


@contextlib.contextmanager
def front(tmp_path: Path, url: str, total: float = 10.0, **options: Any) -> Iterator[Front]:
    source = SourceConfig(
        "pacs",
        "dicomweb",
        url=url,
        headers=(("Authorization", SECRET),),
        deadlines=Deadlines(connect=2.0, message=5.0, total=total),
        **options,
    )
    config = Config(
        ServerConfig(), f"sqlite:///{tmp_path / 'registry.db'}", (source,), auth=AuthConfig(open=True)
    )
    gateway = Gateway(config)
    try:
        yield Front(gateway)
    finally:
        gateway.registry.close()


def assert_refused_cleanly(response: httpx.Response, *reasons: str) -> None:
    assert response.status_code == 502, response.text
    assert "source pacs" in response.text
    assert any(reason in response.text for reason in reasons), response.text
    assert OTHERS_BYTES.decode() not in response.text and SECRET not in response.text


@pytest.mark.network
def test_a_bulk_data_uri_on_another_origin_is_never_fetched_and_the_client_is_told_why(tmp_path, caplog):
    with serving(another_service) as other, serving(pacs(f"{other.url}/dicom-web/steal")) as upstream:
        with front(tmp_path, upstream.url + "/dicom-web") as gateway:
            assert gateway.harvest().indexed == 1
            assert "leaves the source's origin" in caplog.text  # decided (and logged) at harvest
            response = gateway.get(f"{INSTANCE}/bulk/00281201", OCTETS)
    assert_refused_cleanly(response, "leaves the source's origin")
    assert other.seen == []  # not one request, so not one credential
    assert {auth for _, auth in upstream.seen} == {SECRET}  # the source's own origin gets them


@pytest.mark.network
def test_a_relative_bulk_data_uri_climbing_out_of_the_base_path_is_never_fetched(tmp_path, caplog):
    with serving(pacs("../../../../../admin/secrets")) as upstream:
        with front(tmp_path, upstream.url + "/dicom-web") as gateway:
            assert gateway.harvest().indexed == 1
            assert "outside the source's base path" in caplog.text
            response = gateway.get(f"{INSTANCE}/bulk/00281201", OCTETS)
    assert_refused_cleanly(response, "outside the source's base path")
    assert upstream.paths("/admin") == []


@pytest.mark.network
def test_a_bulk_data_uri_under_the_base_path_is_fetched_with_the_credentials(tmp_path):
    # The control case: relative to the metadata's URL (PS3.18, RFC 3986 5.1.3), in the base path.
    with serving(pacs("../../series/" + SERIES + "/instances/" + SOP + "/bulk/00281201")) as upstream:
        with front(tmp_path, upstream.url + "/dicom-web") as gateway:
            gateway.harvest()
            response = gateway.get(f"{INSTANCE}/bulk/00281201", OCTETS)
    assert response.status_code == 200 and b"\x00\x01\x02\x03" in response.content
    assert (f"/dicom-web{INSTANCE}/bulk/00281201", SECRET) in upstream.seen


def redirect_to(other: Peer) -> Callable[[Any, Peer], None]:
    def respond(handler: Any, peer: Peer) -> None:
        send(handler, 302, b"", "text/plain", Location=f"{other.url}/dicom-web{handler.path}")

    return respond


@pytest.mark.network
@pytest.mark.parametrize(
    ("path", "accept"),
    [(f"{INSTANCE}/frames/1", OCTETS), (INSTANCE, DICOM), (f"{INSTANCE}/bulk/00281201", OCTETS)],
    ids=["frame", "instance", "bulk"],
)
def test_an_upstream_redirecting_a_retrieval_elsewhere_is_not_followed(tmp_path, path, accept):
    with serving(another_service) as other:
        in_base = f"/dicom-web{INSTANCE}/bulk/00281201"
        with serving(pacs(in_base, retrieve=redirect_to(other))) as upstream:
            with front(tmp_path, upstream.url + "/dicom-web") as gateway:
                gateway.harvest()
                response = gateway.get(path, accept)
    assert_refused_cleanly(response, "a redirect")
    assert "302" in response.text and "not followed" in response.text
    assert other.seen == []


def trickle(head: bytes, body: bytes, where: str) -> Callable[[Any, Peer], None]:
    """Sends ``head`` and ``body`` a byte per 0.2 s (``where``: "head" trickles the status line
    and headers too, "body" only the body)."""

    def respond(handler: Any, peer: Peer) -> None:
        out = handler.wfile
        try:
            if where == "body":
                out.write(head)
                out.flush()
            for byte in head + body if where == "head" else body:
                if peer.stop.wait(0.2):
                    return
                out.write(bytes([byte]))
                out.flush()
        except OSError:
            peer.notes["closed"] = True

    return respond


QIDO_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nConnection: close\r\n\r\n"
QIDO_BODY = orjson.dumps([uid_item("0020000D", STUDY)] * 20)


@pytest.mark.network
@pytest.mark.parametrize("where", ["body", "head"], ids=["trickled-body", "trickled-status-and-headers"])
def test_a_trickling_qido_answer_fails_the_harvest_at_the_total_deadline(tmp_path, where):
    with serving(trickle(QIDO_HEAD, QIDO_BODY, where)) as upstream:
        with front(tmp_path, upstream.url, total=2.0) as gateway:
            started = time.monotonic()
            with pytest.raises(SourceTimeout) as late:
                gateway.harvest()
            took = time.monotonic() - started
    assert took < 3.0, f"the harvest gave up after {took:.1f} s"
    assert "source pacs" in late.value.message and "/studies" in late.value.message
    assert "total_timeout" in late.value.message


@pytest.mark.network
def test_a_retrieval_whose_status_line_and_headers_trickle_fails_at_the_total_deadline(tmp_path):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: multipart/related; boundary=b\r\nX-Padding: " + b"x" * 100
    in_base = f"/dicom-web{INSTANCE}/bulk/00281201"
    with serving(pacs(in_base, retrieve=trickle(head, b"", "head"))) as upstream:
        with front(tmp_path, upstream.url + "/dicom-web", total=2.0) as gateway:
            gateway.harvest()
            started = time.monotonic()
            response = gateway.get(f"{INSTANCE}/frames/1", OCTETS)
            took = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert "source pacs" in response.text and "total_timeout" in response.text
    assert took < 3.0, f"the retrieval gave up after {took:.1f} s"


def flood(total: int) -> Callable[[Any, Peer], None]:
    """A QIDO answer of ``total`` bytes of valid-looking JSON, sent as fast as the reader takes it."""

    def respond(handler: Any, peer: Peer) -> None:
        item = orjson.dumps(uid_item("0020000D", STUDY)) + b","
        chunk = item * (65536 // len(item))
        handler.send_response(200)
        handler.send_header("Content-Type", "application/dicom+json")
        handler.send_header("Content-Length", str(total))
        handler.end_headers()
        sent = 0
        try:
            handler.wfile.write(b"[")
            while sent < total - 1:
                piece = chunk[: total - 1 - sent]
                handler.wfile.write(piece)
                sent += len(piece)
        except OSError:
            peer.notes["closed"] = True
        finally:
            peer.notes["sent"] = sent
            peer.notes["done"] = True

    return respond


@pytest.mark.network
def test_a_huge_qido_answer_is_refused_at_the_size_limit_and_not_read_further(tmp_path):
    limit, total = 1024 * 1024, 80 * 1024 * 1024
    with serving(flood(total)) as upstream:
        with front(tmp_path, upstream.url, max_answer_bytes=limit) as gateway:
            with pytest.raises(SourceError) as refused:
                gateway.harvest()
        deadline = time.monotonic() + 10
        while "done" not in upstream.notes and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "source pacs" in refused.value.message and "/studies" in refused.value.message
    assert f"{limit} bytes (max_answer_bytes)" in refused.value.message
    assert upstream.notes.get("closed"), "the upstream should have seen its connection closed"
    assert upstream.notes["sent"] < total // 4


def test_the_default_answer_limit_is_64_mib():
    assert SourceConfig("pacs", "dicomweb", url="http://127.0.0.1/dicom-web").max_answer_bytes == 64 * 1024**2


STUDIES = [f"1.2.826.0.1.3680043.8.498.{n}" for n in (21, 22, 23)]


def paging(honour_limit: bool, honour_offset: bool) -> Callable[[Any, Peer], None]:
    """A PACS of three studies (one series, one instance each) that may ignore limit and offset."""

    def respond(handler: Any, peer: Peer) -> None:
        parts = urlsplit(handler.path)
        path = parts.path
        if path == "/studies":
            query = parse_qs(parts.query)
            studies = STUDIES[int(query["offset"][0]) :] if honour_offset else STUDIES
            studies = studies[: int(query["limit"][0])] if honour_limit else studies
            send_json(handler, [uid_item("0020000D", uid) for uid in studies])
        elif path.endswith("/series"):
            send_json(handler, [uid_item("0020000E", path.split("/")[2] + ".1")])
        elif path.endswith("/metadata"):
            study = path.split("/")[2]
            send_json(handler, [instance_json(study, study + ".1", study + ".1.1", "bulk/00281201")])
        else:
            send(handler, 404, b"", "text/plain")

    return respond


def held_studies(gateway: Front) -> list[str]:
    response = gateway.get("/studies", {"Accept": "application/dicom+json"})
    return sorted(item["0020000D"]["Value"][0] for item in response.json())


@pytest.mark.network
@pytest.mark.parametrize(
    ("honour_limit", "honour_offset"),
    [(False, False), (False, True), (True, True)],
    ids=["ignores-limit-and-offset", "ignores-limit", "pages-well"],
)
def test_a_harvest_ends_holding_each_study_once_whatever_the_paging(
    tmp_path, monkeypatch, caplog, honour_limit, honour_offset
):
    monkeypatch.setattr(dicomweb, "_PAGE", 2)
    with serving(paging(honour_limit, honour_offset)) as upstream:
        with front(tmp_path, upstream.url) as gateway:
            stats = gateway.harvest()
            assert held_studies(gateway) == STUDIES
    assert stats.indexed == 3 and stats.seen == 3
    assert len(upstream.paths("/studies?")) <= 3
    if not honour_offset:
        assert "ignores limit and offset" in caplog.text


@pytest.mark.network
def test_an_upstream_ignoring_offset_ends_the_harvest_with_an_error_naming_it(tmp_path, monkeypatch):
    # It sends the first page again and again: the listing cannot be completed, so the harvest
    # fails (and removes nothing) instead of looping forever.
    monkeypatch.setattr(dicomweb, "_PAGE", 2)
    with serving(paging(honour_limit=True, honour_offset=False)) as upstream:
        with front(tmp_path, upstream.url) as gateway:
            with pytest.raises(SourceError) as incomplete:
                gateway.harvest()
    assert "source pacs" in incomplete.value.message and "ignores offset" in incomplete.value.message
    assert len(upstream.paths("/studies?")) == 2


@pytest.mark.network
def test_a_qido_redirect_is_not_followed_at_harvest(tmp_path):
    with serving(another_service) as other:
        with serving(redirect_to(other)) as upstream:
            with front(tmp_path, upstream.url) as gateway:
                with pytest.raises(SourceError) as refused:
                    gateway.harvest()
    assert "source pacs" in refused.value.message and "a redirect" in refused.value.message
    assert SECRET not in refused.value.message
    assert other.seen == []


@pytest.mark.network
def test_errors_name_the_source_but_never_its_credentials(tmp_path):
    with serving(another_service) as closed:
        port = urlsplit(closed.url).port
    with front(tmp_path, f"http://user:pw-in-url@127.0.0.1:{port}/dicom-web") as gateway:
        with pytest.raises(SourceError) as unreachable:
            gateway.harvest()
    assert "source pacs" in unreachable.value.message and "unreachable" in unreachable.value.message
    assert "pw-in-url" not in unreachable.value.message and SECRET not in unreachable.value.message


@pytest.mark.network
def test_an_instance_with_a_non_numeric_number_of_frames_is_skipped_and_the_rest_harvested(tmp_path, caplog):
    def respond(handler: Any, peer: Peer) -> None:
        path = urlsplit(handler.path).path.removeprefix("/dicom-web")
        if path == f"/studies/{STUDY}/series/{SERIES}/metadata":
            bad = instance_json(STUDY, SERIES, SOP, "bulk") | {"00280008": {"vr": "IS", "Value": ["abc"]}}
            good = instance_json(STUDY, SERIES, SOP + ".2", "bulk")
            send_json(handler, [bad, good])
        else:
            pacs("bulk")(handler, peer)

    with serving(respond) as upstream, front(tmp_path, upstream.url + "/dicom-web") as gateway:
        assert gateway.harvest().indexed == 1
    assert "NumberOfFrames 'abc', not a number: skipped" in caplog.text


@pytest.mark.network
def test_a_compressed_answer_is_refused_rather_than_inflated_past_the_limit(tmp_path):
    bomb = gzip.compress(b"[" + b" " * 50_000_000 + b"]")  # 50 MB of JSON in ~50 kB

    def respond(handler: Any, peer: Peer) -> None:
        send(handler, 200, bomb, "application/dicom+json", **{"Content-Encoding": "gzip"})

    with serving(respond) as upstream, front(tmp_path, upstream.url + "/dicom-web") as gateway:
        with pytest.raises(SourceError, match="Content-Encoding 'gzip'"):
            gateway.harvest()
    assert upstream.notes["accept-encoding"] == "identity"
