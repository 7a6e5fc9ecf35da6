"""Bearer tokens against an issuer's JWKS served over HTTP (on loopback): keys fetched, cached, and
fetched again when the issuer rotates to a key the gateway has not seen. (An issuer that hangs or
fails: tests/security/test_idp.py.)"""

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

    def retire(self, kid: str) -> None:
        self.published = [jwk for jwk in self.published if jwk["kid"] != kid]


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
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
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


def test_a_retired_key_is_refused_once_the_rotated_set_is_fetched(jwks, monkeypatch):
    keys, url = jwks
    first = keys.publish("k1")
    auth = authenticator(url)
    auth.principal(token(first, "k1"))
    second = keys.publish("k2")
    keys.retire("k1")  # the issuer rotates: k2 in, k1 out
    monkeypatch.setattr(identity, "_REFRESH", 0.0)
    assert auth.principal(token(second, "k2")).actor == "10001"
    monkeypatch.setattr(identity, "_REFRESH", 10.0)
    assert auth.principal(token(second, "k2", sub="10002")).actor == "10002"
    with pytest.raises(Unauthenticated, match="'k1' is not among"):
        auth.principal(token(first, "k1", sub="10003"))  # signed with the retired key, never seen before
    assert keys.fetches == 2


def test_tokens_naming_unknown_keys_fetch_the_set_at_most_every_10_s(jwks, monkeypatch):
    keys, url = jwks
    key = keys.publish("k1")
    auth = authenticator(url)
    auth.principal(token(key, "k1"))
    for n in range(20):
        with pytest.raises(Unauthenticated, match="is not among"):
            auth.principal(token(key, f"made-up-{n}"))
    assert keys.fetches == 1
    monkeypatch.setattr(identity, "_REFRESH", 0.0)  # as if 10 s had passed
    with pytest.raises(Unauthenticated, match="is not among"):
        auth.principal(token(key, "made-up-20"))
    assert keys.fetches == 2


def test_keys_are_fetched_again_after_their_lifetime(jwks, monkeypatch):
    monkeypatch.setattr(identity, "_LIFETIME", 0.2)
    keys, url = jwks
    key = keys.publish("k1")
    auth = authenticator(url)
    auth.principal(token(key, "k1"))
    keys.publish("k2")
    keys.retire("k1")
    time.sleep(0.25)
    with pytest.raises(Unauthenticated, match="'k1' is not among"):
        auth.principal(token(key, "k1", sub="10002"))
    assert keys.fetches == 2


@pytest.mark.parametrize(
    "jwk, algorithms",
    [
        ({"kty": "RSA", "alg": "RS256"}, ["RS256"]),
        ({"kty": "RSA"}, ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]),
        ({"kty": "EC", "crv": "P-384"}, ["ES384"]),
        ({"kty": "EC", "crv": ["P-256"]}, []),
        ({"kty": "OKP", "crv": "Ed25519"}, ["EdDSA"]),
        ({"kty": "RSA", "alg": "RSA-OAEP"}, []),
        ({"kty": "oct", "alg": "HS256"}, []),
        ({"kty": "oct"}, []),
    ],
    ids=["alg", "rsa", "ec", "ec-bad-crv", "okp", "encryption", "hmac", "oct"],
)
def test_a_key_verifies_only_its_own_algorithms_and_never_hmac(jwk, algorithms):
    assert identity._algorithms_of(jwk) == algorithms


def test_keys_of_no_use_here_are_skipped_and_the_signing_key_kept(jwks):
    keys, url = jwks
    key = keys.publish("k1")
    keys.published[:0] = [
        {**keys.published[0], "kid": "enc", "use": "enc", "alg": "RSA-OAEP"},
        {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
    ]
    auth = authenticator(url)
    assert auth.principal(token(key, "k1")).actor == "10001"
    with pytest.raises(Unauthenticated, match="'enc' is not among"):
        auth.principal(token(key, "enc"))


def test_a_rewritten_jwks_file_is_read_again_for_a_key_it_lacked(tmp_path):
    path = tmp_path / "jwks.json"
    keys = Keys()
    first = keys.publish("k1")
    path.write_bytes(orjson.dumps({"keys": keys.published}))
    issuer = Issuer(issuer=ISSUER, audience="gateway", jwks_file=path)
    auth = Authenticator(AuthConfig(issuers=(issuer,)))
    auth.principal(token(first, "k1"))
    second = keys.publish("k2")
    path.write_bytes(orjson.dumps({"keys": keys.published}))
    assert auth.principal(token(second, "k2")).actor == "10001"
