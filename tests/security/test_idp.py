"""Identity-provider faults stay contained: an issuer whose JWKS endpoint hangs, fails or trickles costs
one bounded fetch, never a stalled gateway nor a flood of fetches; and the PyJWT floor in pyproject.toml
is one the identity code really runs on.

The identity provider is a real HTTP server on a loopback port that counts the fetches it answers.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.access import identity
from gateway.access.control import Access
from gateway.access.identity import Authenticator, Principal
from gateway.app import create_app
from gateway.config import AuthConfig, Issuer, load_config
from gateway.errors import Unauthenticated
from gateway.service import Gateway

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[2]
IDP = "https://idp.test/auth"  # its keys are behind a URL
PSC = "https://psc.test/auth"  # its keys are in a file


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict:
    return {**orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "alg": "RS256"}


def token(key: rsa.RSAPrivateKey, kid: str, issuer: str = IDP, **claims: object) -> str:
    now = time.time()
    payload = {"iss": issuer, "aud": "gateway", "sub": "10001", "exp": now + 60, **claims}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


FORGER = rsa_key()  # an attacker's key: tokens naming made-up kids


def unsigned(header: dict, payload: dict) -> str:
    """A token PyJWT would not write (a header of the attacker's choice), with a bogus signature."""
    parts = [base64.urlsafe_b64encode(orjson.dumps(part)).rstrip(b"=") for part in (header, payload)]
    return b".".join([*parts, b"c2ln"]).decode()


def forged(n: int) -> str:
    return token(FORGER, f"forged-{n}")


class Provider:
    """A JWKS endpoint that answers, hangs, fails (503) or trickles, as a test sets ``mode``."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.mode = "answer"  # "hang", "503", "trickle"
        self.delay = 0.0  # seconds before answering
        self.fetches = 0
        self.released = threading.Event()  # ends every hang at teardown
        self._lock = threading.Lock()
        self.url = ""

    def publish(self, kid: str) -> rsa.RSAPrivateKey:
        key = rsa_key()
        self.keys.append(public_jwk(key, kid))
        return key

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.fetches += 1
        if self.mode == "hang":
            self.released.wait(30)
            return
        time.sleep(self.delay)
        if self.mode == "503":
            handler.send_error(503)
            return
        body = orjson.dumps({"keys": self.keys})
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for i in range(len(body)) if self.mode == "trickle" else [None]:
            handler.wfile.write(body if i is None else body[i : i + 1])
            handler.wfile.flush()
            if i is not None and self.released.wait(0.1):
                return


@pytest.fixture
def idp() -> Iterator[Provider]:
    provider = Provider()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            try:
                provider.handle(self)
            except OSError:  # the gateway gave up on us: that is the point of several tests
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    provider.url = f"http://127.0.0.1:{server.server_port}/certs"
    try:
        yield provider
    finally:
        provider.released.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def deadline(monkeypatch: pytest.MonkeyPatch) -> float:
    """A short fetch deadline, so that tests of hangs take about a second."""
    monkeypatch.setattr(identity, "_DEADLINE", 1.0)
    return 1.0


def authenticator(url: str) -> Authenticator:
    return Authenticator(AuthConfig(issuers=(Issuer(issuer=IDP, audience="gateway", jwks_url=url),)))


def refusal(auth: Authenticator, bearer: str) -> tuple[str, float]:
    """The refusal's message, and how long it took."""
    started = time.monotonic()
    with pytest.raises(Unauthenticated) as refused:
        auth.principal(bearer)
    return refused.value.message, time.monotonic() - started


# -- what never causes a fetch -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bearer",
    [
        "not-a-jwt",
        "a.b.c",
        token(FORGER, "k1", issuer="https://elsewhere.test"),
        unsigned({"alg": "RS256", "kid": ["k1"]}, {"iss": IDP, "aud": "gateway"}),
        token(FORGER, "k" * 1000),
    ],
    ids=["not-a-jwt", "bad-segments", "untrusted-issuer", "kid-not-a-string", "kid-too-long"],
)
def test_a_token_refused_before_its_keys_never_causes_a_fetch(idp, bearer):
    message, _ = refusal(authenticator(idp.url), bearer)
    assert "keys of issuer" not in message
    assert idp.fetches == 0


def test_an_untrusted_issuer_is_named_in_the_refusal_but_bounded():
    auth = authenticator("http://127.0.0.1:9/certs")
    message, _ = refusal(auth, token(FORGER, "k1", issuer="https://x.test/" + "a" * 10_000))
    assert "is not trusted here" in message and len(message) < 200


# -- (a) a hanging endpoint ----------------------------------------------------------------------------------


def test_a_hanging_jwks_endpoint_refuses_the_token_within_the_deadline(idp, deadline):
    idp.mode = "hang"
    message, took = refusal(authenticator(idp.url), forged(0))
    assert f"keys of issuer {IDP} unavailable" in message and "within 1 s" in message
    assert deadline - 0.05 < took < deadline + 0.3
    assert idp.fetches == 1


def test_a_trickling_jwks_endpoint_cannot_extend_the_deadline(idp, deadline):
    idp.publish("k1")
    idp.keys[0]["padding"] = "x" * 200  # 0.1 s a byte: the answer would take half a minute
    idp.mode = "trickle"
    message, took = refusal(authenticator(idp.url), forged(0))
    assert f"keys of issuer {IDP} unavailable" in message
    assert took < deadline + 0.3


def test_after_a_hang_the_issuer_is_not_fetched_again_during_the_cooldown(idp, deadline):
    idp.mode = "hang"
    auth = authenticator(idp.url)
    refusal(auth, forged(0))
    message, took = refusal(auth, forged(1))
    assert f"keys of issuer {IDP} unavailable" in message and took < 0.3
    assert idp.fetches == 1


def gateway_app(tmp_path: Path, jwks_url: str, psc_key: rsa.RSAPrivateKey) -> tuple[Any, Gateway, Access]:
    """A gateway trusting two issuers: IDP (keys by URL) and PSC (keys in a file)."""
    (tmp_path / "jwks.json").write_bytes(orjson.dumps({"keys": [public_jwk(psc_key, "p1")]}))
    (tmp_path / "archive").mkdir()
    (tmp_path / "gateway.toml").write_text(
        f"""
[registry]
url = "sqlite:///{tmp_path / "registry.db"}"
[[auth.issuers]]
issuer = "{IDP}"
audience = "gateway"
jwks_url = "{jwks_url}"
[[auth.issuers]]
issuer = "{PSC}"
audience = "gateway"
jwks_file = "jwks.json"
[[sources]]
name = "archive"
kind = "filesystem"
path = "archive"
"""
    )
    config = load_config(tmp_path / "gateway.toml", env={})
    gateway = Gateway(config)
    access = Access(config, gateway.registry)
    return create_app(gateway, access=access), gateway, access


def test_a_hanging_identity_provider_does_not_stall_other_callers(idp, tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "_DEADLINE", 2.0)
    idp.mode = "hang"
    psc_key = rsa_key()
    app, gateway, access = gateway_app(tmp_path, idp.url, psc_key)
    timings: dict[str, tuple[int, float, float]] = {}  # name -> (status, started, finished)

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:

            async def get(name: str, path: str, after: float, headers: dict[str, str]) -> None:
                await anyio.sleep(after)
                started = time.monotonic()
                response = await http.get(path, headers=headers)
                timings[name] = (response.status_code, started, time.monotonic())
                if name.startswith("hanging"):
                    assert f"keys of issuer {IDP} unavailable" in response.text

            studies = "/dicom-web/studies"
            async with anyio.create_task_group() as group:
                group.start_soon(get, "hanging", studies, 0.0, {"Authorization": f"Bearer {forged(0)}"})
                # More new tokens of the hanging issuer than it has identity threads: they hold up
                # its own tokens only (a pool per issuer), not another issuer's nor a session's.
                for n in range(1, 12):
                    group.start_soon(
                        get, f"hanging {n}", studies, 0.05, {"Authorization": f"Bearer {forged(n)}"}
                    )
                # The others start once the hanging one waits for its keys in a worker thread.
                psc_token = token(psc_key, "p1", issuer=PSC)
                group.start_soon(get, "other issuer", studies, 0.3, {"Authorization": f"Bearer {psc_token}"})
                group.start_soon(get, "no credentials", studies, 0.3, {})
                group.start_soon(get, "link session", studies, 0.3, {"Cookie": "gateway_session=none-such"})
                group.start_soon(get, "health", "/health", 0.3, {})

    try:
        anyio.run(run)
    finally:
        access.close()
        gateway.registry.close()
    status, started, finished = timings.pop("hanging")
    assert status == 401 and 1.9 < finished - started < 2.5
    for n in range(1, 12):
        assert timings.pop(f"hanging {n}")[0] == 401
    assert timings["other issuer"][0] == 200
    for name, (_, begun, ended) in timings.items():
        assert ended - begun < 0.5, f"{name} took {ended - begun:.2f} s while the IdP hung"
        assert ended < finished, f"{name} waited for the hanging request"
    assert idp.fetches == 1


# -- (b) a failing endpoint ----------------------------------------------------------------------------------


def test_a_failing_identity_provider_is_fetched_once_per_cooldown(idp, monkeypatch):
    monkeypatch.setattr(identity, "_COOLDOWN", 1.0)
    idp.mode = "503"
    auth = authenticator(idp.url)
    started = time.monotonic()
    for n in range(50):
        message, _ = refusal(auth, forged(n))
        assert f"keys of issuer {IDP} unavailable" in message
    assert time.monotonic() - started < 1.0, "the 50 tokens must all come within the cooldown"
    assert idp.fetches == 1
    time.sleep(1.0)
    message, _ = refusal(auth, forged(50))
    assert "HTTP 503" in message
    assert idp.fetches == 2


def test_cached_keys_keep_working_while_the_provider_fails(idp, monkeypatch):
    key = idp.publish("k1")
    auth = authenticator(idp.url)
    auth.principal(token(key, "k1"))
    idp.mode = "503"
    monkeypatch.setattr(identity, "_REFRESH", 0.0)  # the forged kid may fetch at once
    assert "HTTP 503" in refusal(auth, forged(0))[0]
    assert auth.principal(token(key, "k1", sub="10002")).actor == "10002"
    assert "not fetched again" in refusal(auth, forged(1))[0]
    assert idp.fetches == 2


# -- (c) one fetch in flight ---------------------------------------------------------------------------------


def test_concurrent_first_tokens_of_an_issuer_share_one_fetch(idp):
    key = idp.publish("k1")
    idp.delay = 0.3  # all 20 arrive while the one fetch is in flight
    auth = authenticator(idp.url)
    tokens = [token(key, "k1", sub=f"1000{n}") for n in range(20)]
    with ThreadPoolExecutor(20) as pool:
        principals = list(pool.map(auth.principal, tokens))
    assert [p.actor for p in principals] == [f"1000{n}" for n in range(20)]
    assert all(isinstance(p, Principal) for p in principals)
    assert idp.fetches == 1


def test_nobody_waits_for_a_retry_of_a_failing_provider(idp, deadline, monkeypatch):
    monkeypatch.setattr(identity, "_COOLDOWN", 0.0)
    idp.mode = "503"
    auth = authenticator(idp.url)
    refusal(auth, forged(0))  # the provider is now known to fail
    idp.mode = "hang"
    with ThreadPoolExecutor(10) as pool:
        prober = pool.submit(refusal, auth, forged(1))
        time.sleep(0.2)  # the retry is in flight
        others = list(pool.map(lambda n: refusal(auth, forged(n)), range(2, 11)))
        assert prober.result()[1] > deadline - 0.25
    assert all(took < 0.3 and "being fetched again" in message for message, took in others)
    assert idp.fetches == 2


# -- the dependency floor ------------------------------------------------------------------------------------

# Run with PyJWT at the floor: the gateway's own identity code, keys by URL (served on loopback) and by
# file, RSA without "alg" beside an EC key and an encryption key; good tokens pass, bad ones are refused.
FLOOR_CHECK = r"""
import base64, json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from gateway.access.identity import Authenticator
from gateway.config import AuthConfig, Issuer
from gateway.errors import Unauthenticated

def release(version):  # "2.8" is 2.8.0
    parts = [int(part) for part in version.split(".")]
    return parts + [0] * (3 - len(parts))
assert release(jwt.__version__) == release(sys.argv[1]), f"PyJWT {jwt.__version__} imported, not the floor"
folder = Path(sys.argv[2])

def b64(number, size):
    return base64.urlsafe_b64encode(number.to_bytes(size, "big")).rstrip(b"=").decode()

signer, other = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
ec_signer = ec.generate_private_key(ec.SECP256R1())
def rsa_jwk(key, **members):
    numbers = key.public_key().public_numbers()
    return {"kty": "RSA", "n": b64(numbers.n, 256), "e": b64(numbers.e, 3), **members}
point = ec_signer.public_key().public_numbers()
keys = {"keys": [
    rsa_jwk(other, kid="enc", use="enc", alg="RSA-OAEP"),
    rsa_jwk(signer, kid="r", use="sig"),
    {"kty": "EC", "crv": "P-256", "x": b64(point.x, 32), "y": b64(point.y, 32), "kid": "e", "alg": "ES256"},
]}
body = json.dumps(keys).encode()
(folder / "jwks.json").write_bytes(body)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_port}/certs"
auth = Authenticator(AuthConfig(issuers=(
    Issuer(issuer="https://url.test", audience="gw", jwks_url=url),
    Issuer(issuer="https://file.test", audience="gw", jwks_file=folder / "jwks.json", role="patient"),
)))

def token(key, kid, algorithm, iss="https://url.test", **claims):
    payload = {"iss": iss, "aud": "gw", "sub": "s1", "ins": "1800175123456", "exp": time.time() + 60}
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})

assert auth.principal(token(signer, "r", "RS256")).actor == "s1"
assert auth.principal(token(signer, "r", "PS256", sub="s2")).actor == "s2"
assert auth.principal(token(ec_signer, "e", "ES256", iss="https://file.test")).ins == "1800175123456"
for bad, why in [
    (token(other, "r", "RS256", sub="s3"), "refused"),
    (token(signer, "r", "RS256", sub="s4", exp=time.time() - 120), "expired"),
    (token(signer, "r", "RS256", sub="s5", aud="elsewhere"), "not meant"),
    (token(signer, "enc", "RS256", sub="s6"), "not among"),
    ("not.a.jwt", "not a JWT"),
]:
    try:
        auth.principal(bad)
    except Unauthenticated as exc:
        assert why in exc.message, exc.message
    else:
        raise AssertionError(f"accepted a token that should be {why}")
print("floor ok")
"""


def pyjwt_floor() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [d for d in dependencies if re.match(r"pyjwt\b", d, re.IGNORECASE)]
    floor = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    assert floor, f"{requirement!r} sets no lower bound"
    return floor.group(1)


def test_the_declared_pyjwt_floor_runs_the_identity_code(tmp_path):
    floor = pyjwt_floor()
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    pip += ["--only-binary", ":all:", "--timeout", "10", "--target", str(target), f"PyJWT=={floor}"]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, f"pip could not install PyJWT=={floor}:\n{installed.stderr[-2000:]}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    checked = subprocess.run(
        [sys.executable, "-c", FLOOR_CHECK, floor, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    problem = checked.stderr[-3000:]
    assert checked.returncode == 0 and "floor ok" in checked.stdout, f"not on PyJWT {floor}:\n{problem}"
