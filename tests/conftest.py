"""Shared fixtures: the bundled DICOM files harvested once into a temporary registry, and an
in-process client for the app (ASGI transport: no ports, no sleeps)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pydicom
import pytest

from gateway.app import create_app
from gateway.config import AuthConfig, Config, ServerConfig, SourceConfig
from gateway.service import Gateway
from tests.backends import BACKENDS, Databases, databases, postgres_problem, postgres_required

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "dicom"


def fixture_files() -> list[Path]:
    return sorted(FIXTURES.rglob("*.dcm"))


def make_config(folder: Path, db: Path | str, name: str = "fixtures") -> Config:
    """``db``: a SQLite file, or any registry URL (``Databases.url``)."""
    sources = (SourceConfig(name, "filesystem", folder),)
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    return Config(ServerConfig(), url, sources, auth=AuthConfig(open=True))


@pytest.fixture(scope="session", params=BACKENDS)
def registry_urls(request: pytest.FixtureRequest) -> Iterator[Databases]:
    """Fresh registry URLs on each backend: every test using the registry runs on both."""
    if request.param == "postgresql":
        problem = postgres_problem()
        if problem and postgres_required():
            pytest.fail(f"GATEWAY_TEST_POSTGRESQL is set but {problem}")
        if problem:
            pytest.skip(problem)
    yield from databases(request.param)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, registry_urls: Databases) -> Iterator[Gateway]:
    db = tmp_path_factory.mktemp("registry") / "registry.db"
    gw = Gateway(make_config(FIXTURES, registry_urls.url(db)))
    stats = gw.harvest("fixtures")
    assert stats.failed == 0, "the bundled fixtures must all index"
    yield gw
    gw.registry.close()


class Client:
    """A synchronous face on httpx's ASGI transport: each request runs the app in-process.

    (starlette's TestClient is deprecated with httpx; this keeps tests plain functions.)"""

    def __init__(self, app) -> None:
        self.app = app
        self.base_url = "http://gateway.test"

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url=self.base_url) as http:
                return await http.request(method, url, **kwargs)

        return anyio.run(send)

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.request("GET", url, **kwargs)


@pytest.fixture(scope="session")
def client(gateway: Gateway) -> Client:
    return Client(create_app(gateway))


@pytest.fixture(scope="session")
def datasets() -> dict[str, pydicom.Dataset]:
    """Every fixture read fully by pydicom, by SOPInstanceUID: the reference for served bytes."""
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in fixture_files())}
