"""Bearer tokens against an issuer's JWKS served over HTTP (on loopback): keys fetched, cached, and
fetched again when the issuer rotates to a key the gateway has not seen."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.access import identity
from gateway.access.identity import Authenticator
from gateway.config import AuthConfig, Issuer
from gateway.errors import Unauthenticated

pytestmark = pytest.mark.network
ISSUER = "https://psc.test/auth"


class Keys:
    def __init__(self) -> None:
        self.published: list[dict] = []
        self.fetches = 0

    def publish(self, kid: str) -> rsa.RSAPrivateKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        self.published.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return key


@pytest.fixture
def jwks() -> Iterator[tuple[Keys, str]]:
    keys = Keys()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            keys.fetches += 1
            body = orjson.dumps({"keys": keys.published})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield keys, f"http://127.0.0.1:{server.server_port}/certs"
    finally:
        server.shutdown()
        server.server_close()


def token(key: rsa.RSAPrivateKey, kid: str, **claims: object) -> str:
    now = time.time()
    payload = {"iss": ISSUER, "aud": "gateway", "sub": "10001", "exp": now + 60, **claims}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


def authenticator(url: str) -> Authenticator:
    issuer = Issuer(issuer=ISSUER, audience="gateway", jwks_url=url, emergency_roles=("samu",))
    return Authenticator(AuthConfig(issuers=(issuer,)))


def test_keys_are_fetched_once_and_reused(jwks):
    keys, url = jwks
    first = keys.publish("k1")
    auth = authenticator(url)
    assert auth.principal(token(first, "k1")).actor == "10001"
    assert auth.principal(token(first, "k1", sub="10002")).actor == "10002"
    assert keys.fetches == 1


def test_a_rotated_key_is_fetched_when_a_token_names_it(jwks, monkeypatch):
    monkeypatch.setattr(identity, "_REFRESH", 0.0)  # no wait between forced fetches
    keys, url = jwks
    first = keys.publish("k1")
    auth = authenticator(url)
    auth.principal(token(first, "k1"))
    second = keys.publish("k2")  # the issuer rotates
    principal = auth.principal(token(second, "k2", roles=["samu"], organization="750000001"))
    assert principal.emergency and principal.organization == "750000001"
    assert keys.fetches == 2


def test_an_unreachable_key_set_refuses_the_token_and_names_the_issuer(jwks):
    keys, _ = jwks
    key = keys.publish("k1")
    auth = authenticator("http://127.0.0.1:9/certs")
    with pytest.raises(Unauthenticated, match=ISSUER):
        auth.principal(token(key, "k1"))
