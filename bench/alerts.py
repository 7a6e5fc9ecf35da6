#!/usr/bin/env python3
"""How soon a subscriber hears of a study copied into a watched folder: 100 studies by default.

Run from the repository root with the project's venv::

    .venv/bin/python bench/alerts.py                        # 100 studies of 3 instances
    .venv/bin/python bench/alerts.py --studies 20 --interval 0.25

A real ``gateway serve`` (SQLite; its folder source watched, ``interval`` an hour so that only
the watcher can make a study appear; authentication with a patient issuer and a professional
issuer sharing a JWKS file; ``[changes] quiet_seconds`` and ``[notify] interval`` as given,
their defaults otherwise). Through the API, the patient grants a professional and the professional
subscribes with a FHIR rest-hook to a receiver on loopback (a thread of this process, so both
clocks are one). Then, one after another, each study of that patient is copied in as an export
would: its directory made, its files copied one by one; the clock starts when the last file is
closed and stops when the receiver has read the notification naming the study. Prints
p50/p95/max (goal: p95 <= 2 s, the quiet period included) and writes them, with every latency,
to bench/out/alerts.json.

The studies (``fixtures.generate.make_ct_study``, 32x32 CT slices whose patient carries an INS)
are generated once into bench/out/alerts/ and reused; the folder and databases are fresh each run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# `bench` is not an installed package: make it importable when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import jwt  # noqa: E402
import orjson  # noqa: E402
import pydicom  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from bench.common import OUT_DIR, REPO, BenchError, log, percentile  # noqa: E402
from bench.report import machine_info  # noqa: E402
from bench.servers import log_problems  # noqa: E402
from fixtures.generate import make_ct_study  # noqa: E402
from fixtures.model import BENCH_UID_ROOT  # noqa: E402
from peers.process import free_port, stop, wait_http  # noqa: E402

WORKDIR = OUT_DIR / "alerts"
GOAL_P95 = 2.0  # seconds from the last file's close to the subscriber's receipt
_PER_STUDY = 30.0  # seconds a study may take before the run is declared broken
_SEED = 7000  # seeds of the studies (their UIDs derive from them), away from other benches'
INS = "1800175123456"
NIR_OID = "1.2.250.1.213.1.4.8"
PORTAL, PSC = "https://portal.bench", "https://psc.bench"
RPPS = "10001"


def prepare(studies: int, instances: int) -> list[Path]:
    """The studies' directories under WORKDIR/studies (made once), each patient's INS set."""
    made = []
    for index in range(studies):
        place = WORKDIR / "studies" / f"{instances}" / f"s{index:04d}"
        if len(list(place.glob("*.dcm"))) != instances:
            shutil.rmtree(place, ignore_errors=True)
            for path in make_ct_study(place, n_instances=instances, rows=32, cols=32, seed=_SEED + index):
                ds = pydicom.dcmread(path)
                item = Dataset()
                item.PatientID, item.IssuerOfPatientID = INS, NIR_OID
                ds.OtherPatientIDsSequence = Sequence([item])
                ds.save_as(path)
        made.append(place)
    return made


class Receiver:
    """A rest-hook endpoint on loopback: when each study's notification was read, by UID."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.duplicates = 0
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the dispatcher's client uses it

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                now = time.perf_counter()
                parts = orjson.loads(body)["entry"][0]["resource"]["parameter"][4]["part"]
                focus = {p["name"]: p for p in parts}["focus"]["valueReference"]["reference"]
                uid = focus.rsplit("urn:oid:", 1)[1]
                with receiver.changed:
                    if uid in receiver.arrived:
                        receiver.duplicates += 1
                    receiver.arrived.setdefault(uid, now)
                    receiver.changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, uid: str, seconds: float) -> float | None:
        with self.changed:
            self.changed.wait_for(lambda: uid in self.arrived, seconds)
            return self.arrived.get(uid)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_config(run_dir: Path, folder: Path, port: int, receiver: str, args: argparse.Namespace) -> Path:
    """The gateway's configuration; its two issuers' keys in a JWKS file beside it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (run_dir / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k", "alg": "RS256"}]}))
    issuers = "".join(
        f'[[auth.issuers]]\nissuer = "{issuer}"\naudience = "gateway"\n'
        f'jwks_file = "{run_dir / "jwks.json"}"\nrole = "{role}"\n'
        for issuer, role in ((PORTAL, "patient"), (PSC, "professional"))
    )
    config = run_dir / "gateway.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[registry]\nurl = "sqlite:///{run_dir / "registry.db"}"\n'
        f"[auth]\n{issuers}"
        f"[changes]\nquiet_seconds = {args.quiet}\n"
        f'[notify]\nallowed_origins = ["{receiver}"]\ninterval = {args.interval}\n'
        f'[[sources]]\nname = "bench"\nkind = "filesystem"\npath = "{folder}"\n'
        "interval = 3600\nwatch = true\n",
        encoding="utf-8",
    )

    def token(issuer: str, **claims: Any) -> str:
        payload = {"iss": issuer, "aud": "gateway", "exp": time.time() + 3600, **claims}
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k"})

    (run_dir / "patient.token").write_text(token(PORTAL, sub="patient", ins=INS))
    (run_dir / "doctor.token").write_text(token(PSC, sub=RPPS, organization="750000001"))
    return config


def subscribe(origin: str, run_dir: Path, endpoint: str) -> None:
    """The patient grants the professional; the professional subscribes (both through the API)."""
    patient = {"Authorization": f"Bearer {(run_dir / 'patient.token').read_text()}"}
    doctor = {"Authorization": f"Bearer {(run_dir / 'doctor.token').read_text()}"}
    granted = httpx.post(f"{origin}/api/grants", json={"grantee": RPPS}, headers=patient, timeout=10)
    if granted.status_code != 201:
        raise BenchError(f"grant refused: {granted.status_code} {granted.text[:200]}")
    body = {"channel": {"type": "rest-hook", "endpoint": endpoint}, "scope": {"patient": INS}}
    made = httpx.post(f"{origin}/api/subscriptions", json=body, headers=doctor, timeout=10)
    if made.status_code != 201:
        raise BenchError(f"subscription refused: {made.status_code} {made.text[:200]}")


def run(args: argparse.Namespace) -> int:
    studies = prepare(args.studies, args.instances)
    run_dir = WORKDIR / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir / "folder"
    folder.mkdir(parents=True)
    receiver = Receiver()
    port = free_port()
    config = write_config(run_dir, folder, port, receiver.origin, args)
    log_path = run_dir / "gateway-serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    origin = f"http://127.0.0.1:{port}"
    latencies: list[float] = []
    try:
        wait_http(f"{origin}/health", proc, "gateway serve", str(log_path))
        subscribe(origin, run_dir, f"{receiver.origin}/fhir/notify")
        time.sleep(1.0)  # the watcher is started beside the first harvest: let it settle
        for index, source in enumerate(studies):
            uid = f"{BENCH_UID_ROOT}{_SEED + index}"
            target = folder / source.name
            target.mkdir()
            for path in sorted(source.glob("*.dcm")):
                shutil.copyfile(path, target / path.name)  # returns once the copy is closed
            landed = time.perf_counter()
            arrived = receiver.wait(uid, _PER_STUDY)
            if arrived is None:
                raise BenchError(f"study {index} not notified after {_PER_STUDY:g} s (see {log_path})")
            latencies.append(arrived - landed)
            if (index + 1) % 10 == 0:
                log(f"{index + 1}/{len(studies)} studies, last {latencies[-1] * 1000:.0f} ms")
        time.sleep(2 * args.interval + 1)  # long enough for a duplicate to come, were one owed
    finally:
        stop(proc)
        receiver.close()
    p50, p95, worst = percentile(latencies, 50), percentile(latencies, 95), max(latencies)
    verdict = "PASS" if p95 <= GOAL_P95 else "MISS"
    print(
        f"{len(latencies)} studies of {args.instances} instances, quiet_seconds {args.quiet:g}, "
        f"notify interval {args.interval:g}: last file closed -> rest-hook notification received"
    )
    print(
        f"p50 {p50 * 1000:.0f} ms   p95 {p95 * 1000:.0f} ms   max {worst * 1000:.0f} ms   "
        f"duplicates {receiver.duplicates}   (goal p95 <= {GOAL_P95:g} s: {verdict})"
    )
    problems = log_problems(log_path)
    for line in problems[:10]:
        print(f"gateway log: {line}")
    (OUT_DIR / "alerts.json").write_text(
        json.dumps(
            {
                "studies": len(latencies),
                "instances": args.instances,
                "quiet_seconds": args.quiet,
                "notify_interval": args.interval,
                "p50_s": p50,
                "p95_s": p95,
                "max_s": worst,
                "duplicates": receiver.duplicates,
                "latencies_s": latencies,
                "machine": machine_info(),
                "log_problems": problems,
            },
            indent=2,
        )
    )
    return 0 if verdict == "PASS" and not problems and not receiver.duplicates else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--studies", type=int, default=100, help="studies copied in, one after another")
    parser.add_argument("--instances", type=int, default=3, help="instances per study")
    parser.add_argument("--quiet", type=float, default=1.0, help="[changes] quiet_seconds (default 1)")
    parser.add_argument("--interval", type=float, default=1.0, help="[notify] interval (default 1)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench/alerts.py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
