"""Real receivers on loopback: an HTTP rest-hook endpoint and an MLLP listener; and the access
suite's site (both registry backends)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import hl7
import orjson
import pytest
from hl7.mllp import start_hl7_server

from gateway.config import load_config
from gateway.service import Gateway
from tests.access.conftest import Site
from tests.access.conftest import site as access_site  # noqa: F401, F811


class Receiver:
    """A rest-hook endpoint: records every POST; answers as ``mode`` says ("ok" 200, "fail" 500,
    "redirect" 302 to ``location``, "hang" no answer for 10 s); ``fail_after``: answer 500 once
    that many were acknowledged."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []  # {"seq", "status", "body", "headers"}
        self.mode = "ok"
        self.location = ""
        self.fail_after: int | None = None
        self._stop = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = receiver._status()
                if status == 0:
                    receiver._stop.wait(10)
                    return
                parsed = orjson.loads(body)
                seq = int(parsed["entry"][0]["resource"]["parameter"][4]["part"][0]["valueString"])
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.received.append({"seq": seq, "status": status, "body": parsed, "headers": headers})
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.origin}/fhir/notify"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _status(self) -> int:
        if self.mode == "hang":
            return 0
        if self.mode == "fail" or (
            self.fail_after is not None and len(self.acknowledged()) >= self.fail_after
        ):
            return 500
        return {"ok": 200, "redirect": 302}[self.mode]

    def acknowledged(self) -> list[int]:
        return [r["seq"] for r in self.received if r["status"] == 200]

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


class MllpListener:
    """An MLLP listener (hl7's asyncio server) in a thread of its own, answering ``ack`` and
    recording every message."""

    def __init__(self, ack: str = "AA") -> None:
        self.ack = ack
        self.messages: list[hl7.Message] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    async def _serve(self) -> None:
        async def answer(reader: Any, writer: Any) -> None:
            try:
                while not writer.is_closing():
                    message = await reader.readmessage()
                    self.messages.append(message)
                    writer.writemessage(message.create_ack(self.ack))
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass
            finally:
                writer.close()

        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        server = await start_hl7_server(answer, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self.origin = f"mllp://127.0.0.1:{self.port}"
        self._ready.set()
        async with server:
            await self._done.wait()

    def close(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(5)


@pytest.fixture
def site(access_site: Site, tmp_path: Path) -> Site:  # noqa: F811 (the imported fixture, by name)
    """The access suite's site, its studies surely indexed: its harvest is skipped while another
    process harvests a source of the same name on the same PostgreSQL database (the harvest lock
    is an advisory lock, database-wide), as other suites running beside this one do."""
    registry = access_site.access.policy.registry
    if not all(registry.study_patient(uid)[0] for uid in access_site.studies.values()):
        gateway = Gateway(load_config(tmp_path / "gateway.toml", env={}))
        try:
            stop = time.monotonic() + 20
            while gateway.harvest("archive") is None:
                assert time.monotonic() < stop, "the site's source could not be harvested"
                time.sleep(0.05)
        finally:
            anyio.run(gateway.aclose)
        access_site.access.policy.forget()
    return access_site


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


@pytest.fixture
def listener() -> Iterator[MllpListener]:
    found = MllpListener()
    yield found
    found.close()
