"""The seeded request fuzzer (``bench/fuzz.py``) over every route of the app, in-process, on both
registry backends: a fixed seed and a bounded number of cases (the bench runs 100,000 against a
real server). The routes come from the app's own route table, so a new route is fuzzed without
being listed anywhere. Each invariant is its own test, so that one failing does not hide the
others: no 5xx, every answer within 2 s, the app still serves afterwards, and one audit record
per audited request."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from bench.fuzz import SLOW, Generator, Report, RouteSpec, route_specs, run_cases, still_serves, write_site
from gateway.access.control import Access
from gateway.app import create_app
from gateway.config import load_config
from gateway.service import Gateway
from tests.backends import Databases

SEED = 5
CASES = 3000  # ~90 per route: about 8 s a backend on 2 cores


class Fuzzed:
    def __init__(self, report: Report, specs: list[RouteSpec], records: Counter[str]) -> None:
        self.report = report
        self.specs = specs
        self.records = records  # audit records per request id


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, registry_urls: Databases) -> Iterator[Fuzzed]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    site = write_site(root, registry_urls.url(root / "registry.db"))
    config = load_config(site.config, env={})
    gateway = Gateway(config)
    for source in config.sources:
        stats = gateway.harvest(source.name)
        assert stats is not None and stats.failed == 0
    access = Access(config, gateway.registry)
    app = create_app(gateway, access=access)
    specs = route_specs(app.starlette.routes)  # type: ignore[attr-defined]
    credentials = site.credentials()
    report = Report()

    async def fuzz() -> None:
        # The app's exceptions come back as the 500 a server would send, to be reported as such.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            access.audit.flush()
            before = access.store.audit_count()
            generator = Generator(SEED, specs, site, credentials)
            report.outcomes = await run_cases(transport, "http://gateway.test", generator, CASES, True)
            access.audit.flush()
            report.audit_records = access.store.audit_count() - before
            report.alive, report.alive_detail = await still_serves(client, site, credentials)

    try:
        anyio.run(fuzz)
        access.audit.flush()
        records = Counter(r.request_id for r in access.store.audit(limit=10 * (CASES + 100)))
        yield Fuzzed(report, specs, records)
    finally:
        access.close()
        anyio.run(gateway.aclose)
        gateway.registry.close()


def test_every_route_of_the_app_is_fuzzed(fuzzed):
    counts = fuzzed.report.routes()
    assert len(fuzzed.specs) >= 25, "the route table was not read"
    thin = {spec.name: counts[spec.name] for spec in fuzzed.specs if counts[spec.name] < 20}
    assert not thin, f"routes with fewer than 20 cases: {thin}"


def test_no_request_gets_a_5xx(fuzzed):
    errors = fuzzed.report.server_errors
    assert not errors, f"{len(errors)} requests got a 5xx or no answer:\n{fuzzed.report.failures()}"


def test_every_answer_comes_within_2_seconds(fuzzed):
    slow = fuzzed.report.slow()
    described = "\n".join(f"{o.seconds:.2f} s {o.status}\n{o.case.describe(300)}" for o in slow[:10])
    assert not slow, f"{len(slow)} answers took {SLOW:g} s or more:\n{described}"


def test_the_app_still_serves_after_the_fuzz(fuzzed):
    assert fuzzed.report.alive, fuzzed.report.alive_detail


def test_every_audited_request_leaves_exactly_one_audit_record(fuzzed):
    """The audit rule: one record per request but /health, the viewer's files and CORS
    preflights. Checked per request (by X-Request-ID) and in total."""
    report = fuzzed.report
    wrong = [
        (o, fuzzed.records[o.request_id or ""])
        for o in report.outcomes
        if fuzzed.records[o.request_id or ""] != (1 if o.audited else 0)
    ]
    described = "\n".join(
        f"{count} records, expected {int(o.audited)}; answered {o.status}\n{o.case.describe(200)}"
        for o, count in wrong[:10]
    )
    kinds = Counter((o.case.method, o.case.route, o.status) for o, _ in wrong).most_common(10)
    assert not wrong, (
        f"{len(wrong)} requests with a wrong number of audit records, by kind {kinds}:\n{described}"
    )
    assert report.audit_records == report.audited_requests
