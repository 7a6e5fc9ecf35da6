"""A real ``gateway serve``: no secret in its log, no forged log line, open access kept on
loopback, and behind a TLS proxy the right client address, scheme, cookie and headers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from peers.gateway import ROOT, folder_source, running_gateway
from tests.helpers import PORTAL, PSC, issuers, study_with_ins

pytestmark = pytest.mark.network
INS = "1800175123456"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Keys, an archive (with a file whose name carries a newline) and the [auth] section."""
    work = tmp_path_factory.mktemp("deployment")
    folder = work / "archive"
    study = study_with_ins(folder, INS, seed=5)
    (folder / "junk\n2026-01-01 00:00:00 ERROR gateway: FORGED LINE.dcm").write_bytes(b"not DICOM" * 20)
    found = issuers(work)
    auth, token = found.auth, found.token

    return {"work": work, "folder": folder, "study": study, "auth": auth, "token": token}


@pytest.fixture
def served(deployment: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    server = getattr(request, "param", "")
    patient = {"Authorization": f"Bearer {deployment['token'](PORTAL, sub='p', ins=INS)}"}
    source = folder_source("archive", deployment["folder"])
    with running_gateway(source, tmp_path, auth=deployment["auth"], headers=patient, server=server) as url:
        yield url.removesuffix("/dicom-web")


def test_no_secret_and_no_forged_line_reaches_the_log(deployment, served, tmp_path):
    patient_token = deployment["token"](PORTAL, sub="p", ins=INS)
    expired = deployment["token"](PSC, lifetime=-600, sub="10001")
    patient = {"Authorization": f"Bearer {patient_token}"}
    made = httpx.post(f"{served}/api/links", json={"StudyInstanceUID": deployment["study"]}, headers=patient)
    assert made.status_code == 201, made.text
    secret = urlsplit(made.json()["url"]).path.removeprefix("/link/")
    opened = httpx.get(f"{served}/link/{secret}")
    session = opened.cookies["gateway_session"]
    guessed = "guessed-secret-" + "x" * 30
    httpx.get(f"{served}/link/{guessed}")  # 404: logged
    httpx.get(f"{served}/link/{guessed}%0A2026-01-01%20FORGED%20LINE")
    httpx.get(f"{served}/dicom-web/studies", headers={"Authorization": f"Bearer {expired}"})  # 401
    httpx.get(f"{served}/dicom-web/studies/1.2.3%0D%0AFORGED%20LINE/metadata", headers=patient)
    cookie = {"Cookie": f"gateway_session={session}"}
    assert httpx.get(f"{served}/dicom-web/studies", headers=cookie).status_code == 200
    httpx.delete(f"{served}/api/links/{made.json()['id']}", headers=patient)
    httpx.get(f"{served}/dicom-web/studies", headers=cookie)  # 401: the session ended with the link

    time.sleep(0.3)
    log = (tmp_path / "gateway.log").read_text()
    for name, value in [
        ("link secret", secret),
        ("guessed secret", guessed),
        ("session", session),
        ("patient token", patient_token),
        ("expired token", expired),
    ]:
        assert value not in log, f"the {name} is in the log"
    assert "/link/" in log  # the refusals were logged, without their secrets
    lines = log.splitlines()
    assert not [line for line in lines if "FORGED LINE" in line and not line[:4].isdigit()]
    assert not [line for line in lines if line.startswith("2026-01-01")]
    assert any("FORGED LINE" in line and "\\x0a" in line for line in lines)  # escaped, on its line


TLS_PROXY = (
    'public_url = "https://imaging.example"\ntrusted_proxies = ["127.0.0.1"]\nhsts_seconds = 31536000\n'
)


def history(served: str, deployment: dict[str, Any]) -> list[dict[str, Any]]:
    patient = {"Authorization": f"Bearer {deployment['token'](PORTAL, sub='p', ins=INS)}"}
    return httpx.get(f"{served}/api/audit", headers=patient).json()


@pytest.mark.parametrize("served", [TLS_PROXY], indirect=True, ids=["behind a trusted proxy"])
def test_behind_a_trusted_tls_proxy_the_client_scheme_cookie_and_hsts_are_right(deployment, served):
    forwarded = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    patient = {"Authorization": f"Bearer {deployment['token'](PORTAL, sub='p', ins=INS)}", **forwarded}
    response = httpx.post(
        f"{served}/api/links", json={"StudyInstanceUID": deployment["study"]}, headers=patient
    )
    assert response.json()["url"].startswith("https://imaging.example/link/")
    assert response.headers["strict-transport-security"] == "max-age=31536000"
    opened = httpx.get(served + urlsplit(response.json()["url"]).path, headers=forwarded)
    assert "secure" in opened.headers["set-cookie"].lower()
    assert history(served, deployment)[0]["client"] == "203.0.113.9"


def test_without_trusted_proxies_forwarded_headers_are_ignored(deployment, served):
    forwarded = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    patient = {"Authorization": f"Bearer {deployment['token'](PORTAL, sub='p', ins=INS)}", **forwarded}
    response = httpx.get(f"{served}/dicom-web/studies", headers=patient)
    assert response.status_code == 200
    assert "strict-transport-security" not in response.headers
    assert response.headers["cache-control"] == "no-store"  # never in a shared cache
    assert history(served, deployment)[1]["client"] == "127.0.0.1"


@pytest.mark.parametrize(("size", "status"), [(8_000, 401), (60_000, 401), (2_000_000, 431)])
def test_a_request_head_is_bounded_at_the_connection(served, size, status):
    """uvicorn keeps a request's head whole: past 64 KiB the connection answers 431 and closes."""
    host, port = urlsplit(served).hostname, urlsplit(served).port
    with socket.create_connection((host, port), timeout=10) as connection:
        head = b"GET /dicom-web/studies HTTP/1.1\r\nHost: gateway\r\nX-Junk: " + b"a" * size
        try:
            connection.sendall(head + b"\r\n\r\n")
        except OSError:
            pass  # the server may close before it has read everything
        answer = connection.recv(200)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert httpx.get(f"{served}/health").status_code == 200


def test_open_access_refuses_to_listen_beyond_loopback(tmp_path):
    env = {**os.environ, "GATEWAY_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--host", "0.0.0.0", "--port", "0", "--no-harvest"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "auth.open: refusing to listen on 0.0.0.0" in done.stderr
