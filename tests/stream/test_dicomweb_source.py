"""A DICOMweb upstream as a source, proven against a real server: another gateway on loopback
(gateway-of-gateways), with the upstream up, down, silent, and beside a folder holding the same
instances."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from peers.gateway import dicomweb_source, folder_source, running_gateway
from tests.conftest import FIXTURES, fixture_files
from tests.helpers import assert_frames_and_instance, expected_frames

pytestmark = pytest.mark.network

ANY_FRAME = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_gateway(folder_source("pacs", FIXTURES), tmp_path_factory.mktemp("upstream")) as url:
        yield url


@pytest.fixture(scope="module")
def gateway(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_gateway(dicomweb_source("remote", upstream), tmp_path_factory.mktemp("front")) as url:
        yield url


def uids(url: str, path: str, tag: str) -> dict[str, dict]:
    response = httpx.get(f"{url}{path}", timeout=10)
    assert response.status_code == 200, response.text
    return {item[tag]["Value"][0]: item for item in response.json()}


def test_qido_answers_what_the_upstream_holds_with_the_same_counts(upstream, gateway):
    ours, theirs = uids(gateway, "/studies", "0020000D"), uids(upstream, "/studies", "0020000D")
    assert set(ours) == set(theirs)
    for uid, study in ours.items():
        assert study["00201208"] == theirs[uid]["00201208"]  # NumberOfStudyRelatedInstances
        assert study["00081190"]["Value"][0] == f"{gateway}/studies/{uid}"  # RetrieveURL: ours


def test_metadata_is_the_upstreams_with_bulk_uris_pointing_here(upstream, gateway):
    ds = pydicom.dcmread(next(FIXTURES.rglob("*native_multiframe*.dcm")), stop_before_pixels=True)
    path = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"
    ours = {i["00080018"]["Value"][0]: i for i in httpx.get(gateway + path, timeout=10).json()}
    theirs = {i["00080018"]["Value"][0]: i for i in httpx.get(upstream + path, timeout=10).json()}
    assert set(ours) == set(theirs)
    item = ours[str(ds.SOPInstanceUID)]
    assert item["7FE00010"]["BulkDataURI"].startswith(gateway + "/studies/")
    assert item["00100010"] == theirs[str(ds.SOPInstanceUID)]["00100010"]


@pytest.mark.parametrize("path", fixture_files(), ids=lambda p: Path(p).stem)
def test_instances_and_frames_streamed_through_equal_the_source_file(gateway, path):
    assert_frames_and_instance(gateway, path)


def test_a_source_down_leaves_search_working_and_retrieve_names_it(tmp_path):
    with running_gateway(folder_source("pacs", FIXTURES), tmp_path / "up") as upstream:
        stopping = running_gateway(dicomweb_source("site-b", upstream), tmp_path / "front")
        gateway = stopping.__enter__()
    try:  # the upstream is stopped now; the front gateway keeps its index
        studies = uids(gateway, "/studies", "0020000D")
        assert studies
        ds = pydicom.dcmread(fixture_files()[0], stop_before_pixels=True)
        url = (
            f"{gateway}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/frames/1"
        )
        response = httpx.get(url, headers=ANY_FRAME, timeout=10)
        assert response.status_code == 503
        assert "site-b" in response.text and "unreachable" in response.text
    finally:
        stopping.__exit__(None, None, None)


def test_an_instance_held_twice_is_listed_once_and_fails_over_to_the_other_location(tmp_path):
    with running_gateway(folder_source("pacs", FIXTURES), tmp_path / "up") as upstream:
        front = running_gateway(
            dicomweb_source("remote", upstream, priority=0) + folder_source("local", FIXTURES, priority=1),
            tmp_path / "front",
        )
        gateway = front.__enter__()
        expected = {
            str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in fixture_files()
        }
        assert set(uids(gateway, "/studies", "0020000D")) == expected
        instances = httpx.get(f"{gateway}/instances", timeout=10).json()
        assert len(instances) == len(fixture_files())  # de-duplicated by SOP Instance UID
    try:  # the preferred (remote) location is gone: frames come from the folder
        ds = pydicom.dcmread(fixture_files()[0])
        url = (
            f"{gateway}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/frames/1"
        )
        response = httpx.get(url, headers=ANY_FRAME, timeout=10)
        assert response.status_code == 200
        assert expected_frames(ds)[0] in response.content
    finally:
        front.__exit__(None, None, None)


class _SilentOnFrames(http.server.BaseHTTPRequestHandler):
    """An upstream that answers searches (by asking a real gateway) but never sends frames."""

    upstream = ""
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if "/frames/" in self.path:
            self.release.wait(60)  # silent: no status line, no bytes
            return
        answer = httpx.get(self.upstream + self.path, headers={"Accept": self.headers.get("Accept", "*/*")})
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, *args: object) -> None:
        pass


def test_a_silent_source_hits_the_deadline_with_a_504(upstream, tmp_path):
    handler = type("Handler", (_SilentOnFrames,), {"upstream": upstream, "release": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    silent = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with running_gateway(dicomweb_source("slow", silent, timeout=1.0), tmp_path / "front") as gateway:
            ds = pydicom.dcmread(fixture_files()[0], stop_before_pixels=True)
            url = (
                f"{gateway}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}/frames/1"
            )
            response = httpx.get(url, headers=ANY_FRAME, timeout=20)
            assert response.status_code == 504
            assert "slow" in response.text and "deadline" in response.text
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()


class _CutsOneInstance(http.server.BaseHTTPRequestHandler):
    """An upstream that passes everything through, but dies half-way through one instance."""

    upstream = ""
    victim = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        answer = httpx.get(self.upstream + self.path, headers={"Accept": self.headers.get("Accept", "*/*")})
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        if self.victim in self.path and "/metadata" not in self.path:
            self.wfile.write(answer.content[: len(answer.content) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(answer.content)

    def log_message(self, *args: object) -> None:
        pass


def test_an_upstream_dying_mid_transfer_aborts_ours_for_a_study_and_for_a_frame(upstream, tmp_path):
    study = [pydicom.dcmread(p, stop_before_pixels=True) for p in fixture_files()]
    first = study[0]
    members = [ds for ds in study if ds.StudyInstanceUID == first.StudyInstanceUID]
    victim = members[-1]
    handler = type(
        "Handler", (_CutsOneInstance,), {"upstream": upstream, "victim": str(victim.SOPInstanceUID)}
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cutting = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with running_gateway(dicomweb_source("flaky", cutting), tmp_path / "front") as gateway:
            accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
            with pytest.raises(httpx.RemoteProtocolError):  # never a response that looks complete
                httpx.get(f"{gateway}/studies/{first.StudyInstanceUID}", headers=accept, timeout=30)
            frame = (
                f"{gateway}/studies/{victim.StudyInstanceUID}/series/{victim.SeriesInstanceUID}"
                f"/instances/{victim.SOPInstanceUID}/frames/1"
            )
            with pytest.raises(httpx.RemoteProtocolError):  # frames pass through as they come
                httpx.get(frame, headers=ANY_FRAME, timeout=30)
            assert httpx.get(f"{gateway}/studies", timeout=10).status_code == 200
    finally:
        server.shutdown()
        server.server_close()


def frame_url(base: str, ds: pydicom.Dataset) -> str:
    return (
        f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/1"
    )


def test_a_frame_whose_upstream_announced_its_length_is_sent_with_a_content_length(upstream, gateway):
    ds = pydicom.dcmread(fixture_files()[0], stop_before_pixels=True)
    theirs = httpx.get(frame_url(upstream, ds), headers=ANY_FRAME, timeout=10)
    ours = httpx.get(frame_url(gateway, ds), headers=ANY_FRAME, timeout=10)
    assert ours.status_code == 200 and "chunked" not in ours.headers.get("transfer-encoding", "")
    assert int(ours.headers["content-length"]) == len(ours.content)
    boundary = theirs.headers["content-type"].split("boundary=")[1]
    part = theirs.content.split(b"\r\n\r\n", 1)[1].rsplit(f"\r\n--{boundary}--".encode(), 1)[0]
    assert part in ours.content  # the same frame bytes, in the gateway's own multipart framing


class _LiesAboutLength(http.server.BaseHTTPRequestHandler):
    """An upstream whose frame parts announce more bytes than they hold."""

    upstream = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        answer = httpx.get(self.upstream + self.path, headers={"Accept": self.headers.get("Accept", "*/*")})
        body = answer.content
        if "/frames/" in self.path:
            head, rest = body.split(b"\r\n\r\n", 1)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = head.replace(f"{length}".encode(), f"{length + 10}".encode()) + b"\r\n\r\n" + rest
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_an_upstream_part_shorter_than_announced_aborts_the_transfer(upstream, tmp_path):
    handler = type("Handler", (_LiesAboutLength,), {"upstream": upstream})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        liar = f"http://127.0.0.1:{server.server_address[1]}"
        with running_gateway(dicomweb_source("liar", liar), tmp_path / "front") as gateway:
            ds = pydicom.dcmread(fixture_files()[0], stop_before_pixels=True)
            with pytest.raises(httpx.RemoteProtocolError):  # never a frame that looks complete
                httpx.get(frame_url(gateway, ds), headers=ANY_FRAME, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
