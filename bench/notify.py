#!/usr/bin/env python3
"""Delivery throughput to 100 subscribers: notifications acknowledged per second.

Run from the repository root with the project's venv::

    .venv/bin/python bench/notify.py                       # SQLite access store
    .venv/bin/python bench/notify.py --postgresql postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/notify.py --subscribers 100 --events 20

A registry is harvested from ``--studies`` small studies of one patient (one instance each), the
patient grants ``--subscribers`` professionals, each of whom has a rest-hook subscription to a
receiver on loopback (Python's ThreadingHTTPServer, HTTP/1.1 keep-alive, answering 200, in a
process of its own). ``--events`` study events are put on the feed; then the dispatcher's passes
(``Dispatcher.run_once``: fan-out with a consent check per subscriber and event, then delivery
with the consent checked again, one audit record per attempt) run until every row is delivered.
Prints the fan-out time, the delivery time, and deliveries/s (events x subscribers over the
whole), with the audit records flushed inside the timing.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

# `bench` is not an installed package: make it importable when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from bench.common import log  # noqa: E402
from fixtures.generate import make_ct_study  # noqa: E402
from gateway.access.audit import AuditLog  # noqa: E402
from gateway.access.identity import grantee_key  # noqa: E402
from gateway.access.policy import Policy  # noqa: E402
from gateway.access.store import AccessStore  # noqa: E402
from gateway.config import NotifyConfig, load_config  # noqa: E402
from gateway.notify.dispatch import Dispatcher  # noqa: E402
from gateway.notify.store import SubscriptionStore  # noqa: E402
from gateway.service import Gateway  # noqa: E402
from gateway.types import Change  # noqa: E402

PSC = "https://psc.bench/auth"
INS = "1800175123456"
_RECEIVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def studies(folder: Path, count: int) -> list[str]:
    uids = [f"1.2.826.0.1.77.{i + 1}" for i in range(count)]
    for uid in uids:
        for path in make_ct_study(folder / uid, n_instances=1, rows=16, cols=16, study_uid=uid):
            ds = pydicom.dcmread(path)
            item = Dataset()
            item.PatientID, item.IssuerOfPatientID = INS, "1.2.250.1.213.1.4.8"
            ds.OtherPatientIDsSequence = Sequence([item])
            ds.save_as(path)
    return uids


def postgres_schema(url: str) -> tuple[str, str]:
    import psycopg

    schema = f"gw_bench_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}", schema


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--events", type=int, default=20, help="study events on the feed")
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--postgresql", default=None, help="a PostgreSQL URL (a schema of its own)")
    args = parser.parse_args()

    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER], stdout=subprocess.PIPE, text=True)
    schema = None
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        origin = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            uids = studies(work / "archive", args.studies)
            if args.postgresql:
                url, schema = postgres_schema(args.postgresql)
            else:
                url = f"sqlite:///{work / 'registry.db'}"
            (work / "gateway.toml").write_text(
                f'[registry]\nurl = "{url}"\n[auth]\nopen = true\n'
                '[[sources]]\nname = "archive"\nkind = "filesystem"\npath = "archive"\n'
            )
            gateway = Gateway(load_config(work / "gateway.toml", env={}))
            gateway.harvest("archive")
            registry, access_url = gateway.registry, gateway.config.access_database
            store = AccessStore(access_url)
            policy = Policy(store, registry)
            audit = AuditLog(store)
            subscriptions = SubscriptionStore(store.db)
            for i in range(args.subscribers):
                rpps = f"1{i:05d}"
                store.add_grant(INS, grantee_key("pro", PSC, rpps), None)
                subscriptions.add(
                    issuer=PSC, subject=rpps, role="professional", organization=None, patient=None,
                    channel="rest-hook", endpoint=f"{origin}/notify/{rpps}", header=None,
                    payload="id-only", cursor=0,
                )  # fmt: skip
            now = time.time()
            events = [
                Change(i + 1, now, "study.updated", "", uids[i % len(uids)], None, INS, 1)
                for i in range(args.events)
            ]

            def feed(since: int, limit: int) -> list[Change]:
                return [e for e in events if e.seq > since][:limit]

            config = NotifyConfig(allowed_origins=(origin,), deadline=5.0)
            dispatcher = Dispatcher(
                subscriptions, policy, feed, config, "https://gateway.bench", audit.append
            )
            expected = args.subscribers * args.events
            started = time.perf_counter()
            queued = dispatcher.fan_out()
            fanned = time.perf_counter()
            delivered = 0
            while delivered < expected:
                _, attempts = anyio.run(dispatcher.run_once)
                delivered += attempts
                if attempts == 0:
                    time.sleep(0.05)
            audit.flush()
            ended = time.perf_counter()
            assert queued == expected, (queued, expected)
            backend = "postgresql" if args.postgresql else "sqlite"
            log(
                f"notify ({backend}): {args.subscribers} subscribers x {args.events} events = {expected} "
                f"notifications; fan-out {fanned - started:.2f} s "
                f"({expected / (fanned - started):.0f} rows/s), "
                f"delivery {ended - fanned:.2f} s ({expected / (ended - fanned):.0f} deliveries/s); "
                f"overall {expected / (ended - started):.0f} notifications/s "
                f"({args.events / (ended - started):.1f} events/s to all {args.subscribers})"
            )
            store.close()
            anyio.run(gateway.aclose)
    finally:
        receiver.terminate()
        receiver.wait(5)
        if schema and args.postgresql:
            import psycopg

            with psycopg.connect(args.postgresql, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


if __name__ == "__main__":
    main()
