"""New-study alerts end to end, with real parts only: a ``gateway serve`` process watching a
folder, a patient's grant and a professional's rest-hook subscription made through the API, a
real HTTP receiver on loopback. Studies are copied into the folder file by file; the receiver is
stopped, the gateway killed (SIGKILL) while a delivery is pending and started again on the same
data, the receiver started again on the same port."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from peers.process import free_port, stop, wait_http
from tests.helpers import PORTAL, PSC, issuers, study_with_ins

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[2]
GRANTED, STRANGER = "1800175123456", "2900275123456"  # INS of a patient who grants, of one who does not
RPPS = "10001"
QUIET = 0.5  # [changes] quiet_seconds: files copied closer together than this make one study
SETTLED = 2.5  # seconds in which a duplicate, had there been one, would have come


class Hook:
    """A rest-hook receiver on a fixed loopback port that can be stopped and started again;
    every POST it answered (200) is kept across restarts, in order: (event number, study)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/fhir/notify"
        self.received: list[tuple[int, str]] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = orjson.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                received.append(event_of(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def event_of(bundle: dict[str, Any]) -> tuple[int, str]:
    """The event number and the Study Instance UID a notification Bundle names."""
    parts = {p["name"]: p for p in bundle["entry"][0]["resource"]["parameter"][4]["part"]}
    focus = parts["focus"]["valueReference"]["reference"]
    return int(parts["event-number"]["valueString"]), focus.rsplit("urn:oid:", 1)[1]


class Served:
    """``gateway serve`` on one configuration and port, killed and started again at will."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.log, self.origin = config, log, f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_http(f"{self.origin}/health", self.process, "gateway serve", str(self.log), timeout=30)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    folder, staging = tmp_path / "watched", tmp_path / "staging"
    folder.mkdir()
    studies = {
        "first": study_with_ins(staging / "first", GRANTED, seed=71),
        "second": study_with_ins(staging / "second", GRANTED, seed=72),
        "other": study_with_ins(staging / "other", STRANGER, seed=73),
    }
    found = issuers(tmp_path)
    hook = Hook()
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[registry]\nurl = "sqlite:///{tmp_path / "registry.db"}"\n'
        f"{found.auth}"
        f"[changes]\nquiet_seconds = {QUIET}\n"
        f'[notify]\nallowed_origins = ["http://127.0.0.1:{hook.port}"]\n'
        "deadline = 2\nfirst_retry = 0.2\nmax_backoff = 0.5\ninterval = 0.1\n"
        f'[[sources]]\nname = "archive"\nkind = "filesystem"\npath = "{folder}"\n'
        "interval = 3600\nwatch = true\n"
    )
    gateway = Served(config, port, tmp_path / "gateway.log")
    hook.start()
    gateway.start()
    try:
        yield {
            "gateway": gateway,
            "hook": hook,
            "folder": folder,
            "staging": staging,
            "studies": studies,
            "patient": {"Authorization": f"Bearer {found.token(PORTAL, sub='p1', ins=GRANTED)}"},
            "stranger": {"Authorization": f"Bearer {found.token(PORTAL, sub='p2', ins=STRANGER)}"},
            "doctor": {"Authorization": f"Bearer {found.token(PSC, sub=RPPS, organization='750000001')}"},
        }
    finally:
        gateway.stop()
        hook.stop()


def copy_in(setup: dict[str, Any], name: str) -> None:
    """Copy a staged study into the watched folder one file at a time, as an export would,
    with pauses shorter than the quiet period: several harvests, one study."""
    source, target = setup["staging"] / name, setup["folder"] / name
    target.mkdir()
    for index, path in enumerate(sorted(source.glob("*.dcm"))):
        if index:
            time.sleep(QUIET / 2)
        shutil.copyfile(path, target / path.name)


def eventually(check: Callable[[], Any], within: float, what: str) -> Any:
    stop = time.monotonic() + within
    while not (found := check()):
        assert time.monotonic() < stop, f"not within {within} s: {what}"
        time.sleep(0.05)
    return found


def api(setup: dict[str, Any], method: str, path: str, who: str, **kwargs: Any) -> httpx.Response:
    origin = setup["gateway"].origin
    return httpx.request(method, f"{origin}{path}", headers=setup[who], timeout=10, **kwargs)


def announced(setup: dict[str, Any], who: str, study: str) -> int | None:
    """The seq of the study's ``study.available`` in the change feed as ``who`` reads it."""
    changes = api(setup, "GET", "/api/changes?since=0&limit=1000", who).json()["changes"]
    return next(
        (c["seq"] for c in changes if c["kind"] == "study.available" and c["StudyInstanceUID"] == study),
        None,
    )


def failed_attempt(setup: dict[str, Any], study: str) -> bool:
    """Has the patient's audit recorded a failed delivery of ``study``?"""
    records = api(setup, "GET", "/api/audit?limit=1000", "patient").json()
    return any(
        r["action"] == "notify.deliver" and r.get("study") == study and r["outcome"] != "success"
        for r in records
    )


def test_a_granted_study_is_notified_once_in_order_across_a_killed_gateway(setup):
    hook, gateway, studies = setup["hook"], setup["gateway"], setup["studies"]
    granted = api(setup, "POST", "/api/grants", "patient", json={"grantee": RPPS})
    assert granted.status_code == 201, granted.text
    body = {"channel": {"type": "rest-hook", "endpoint": hook.url}}  # scope: every granting patient
    subscribed = api(setup, "POST", "/api/subscriptions", "doctor", json=body)
    assert subscribed.status_code == 201, subscribed.text

    # A study of a patient who granted nobody, then one of the granting patient.
    copy_in(setup, "other")
    copy_in(setup, "first")
    eventually(lambda: hook.received, 10, "the first study's notification")
    first_seq = eventually(lambda: announced(setup, "patient", studies["first"]), 5, "first announced")
    assert announced(setup, "stranger", studies["other"]) is not None  # announced, not delivered
    time.sleep(SETTLED)
    assert hook.received == [(first_seq, studies["first"])]  # one for the study, not one per file

    # The receiver goes away; a second study comes; the gateway dies while it is owed.
    hook.stop()
    copy_in(setup, "second")
    eventually(lambda: failed_attempt(setup, studies["second"]), 10, "a failed attempt of the second")
    gateway.kill()
    gateway.start()
    hook.start()
    eventually(lambda: len(hook.received) >= 2, 10, "the second study's notification after restarts")
    time.sleep(SETTLED)

    second_seq = announced(setup, "patient", studies["second"])
    assert second_seq is not None and second_seq > first_seq
    assert hook.received == [(first_seq, studies["first"]), (second_seq, studies["second"])]
    assert studies["other"] not in {study for _, study in hook.received}
