"""Who is calling: bearer JWTs from configured OpenID Connect issuers, turned into a ``Principal``.

A token is accepted when its signature verifies with a key of its issuer's JWKS (by ``kid``), and
``iss``, ``aud``, ``exp`` and ``nbf`` hold (with the issuer's leeway for clock skew). PyJWT checks
signatures and claims; getting the keys is this module's, because an identity provider that hangs
or fails must cost the gateway little:

- A token that is not a JWT, or names an issuer not configured here, is refused before any key is
  looked up: it never causes a fetch.
- An issuer's ``jwks_url`` is fetched once and its keys used for 5 minutes. A token naming a key the
  set lacks (the issuer rotated its keys) fetches the set again, at most every 10 s, so tokens naming
  made-up keys cannot turn the gateway into a flood on the issuer. A key the new set no longer holds is
  refused from then on. A ``jwks_file`` is read again when a token names a key it lacks and the file
  changed.
- A fetch has a deadline (2 s to connect, 5 s for the whole answer) and runs in a thread of its own,
  at most one per issuer: callers wait for it on an event, so neither a trickle of bytes nor a name
  lookup that hangs keeps them past the deadline. Callers needing that issuer's keys meanwhile wait
  for that fetch; when the issuer's last fetch failed, they are refused at once instead (see
  ``Authenticator._fetched_key``).
- After a failed fetch (no answer in time, an HTTP error, no usable key), tokens needing fresh keys of
  that issuer are refused for 15 s (401, naming the issuer's keys as unavailable) without another
  fetch; tokens signed with keys still cached keep working.

Verified tokens are remembered until they expire (even if the issuer retires their key meanwhile), so
a viewer sending the same token with every frame costs one dictionary lookup, not a signature check.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx
import jwt
from jwt import PyJWK

from gateway.config import AuthConfig, Issuer
from gateway.errors import Unauthenticated

__all__ = ["Principal", "Authenticator", "OPEN", "ANONYMOUS", "grantee_key"]

log = logging.getLogger("gateway.access")

_CONNECT = 2.0  # seconds to connect to an issuer's JWKS endpoint
_DEADLINE = 5.0  # seconds for a whole fetch of an issuer's keys: a healthy one takes milliseconds
_LIFETIME = 300.0  # seconds an issuer's fetched keys are used before being fetched again
_REFRESH = 10.0  # seconds between fetches caused by tokens naming a key the set lacks
_COOLDOWN = 15.0  # after a failed fetch, no other for this long: at most 4 a minute hit a failing issuer
_MAX_JWKS = 512 * 1024  # bytes of a JWKS answer (a real one is a few KB)
_MAX_KEYS = 100  # keys read from one set
_MAX_KID = 128  # characters of a token's key id
_SHOWN = 80  # characters of a token's own values (iss) repeated in a refusal
_REMEMBERED = 4096  # verified tokens kept (until they expire)
_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}  # RFC 7518 3.4


@dataclass(frozen=True)
class Principal:
    """The caller. ``role`` is "patient", "professional", "system" (software with its own
    credentials, acting for an organization), "link", "open" or "anonymous"."""

    role: str
    actor: str  # RPPS / patient subject / system client id / "link:<id>" / "anonymous"
    issuer: str | None = None  # the token's issuer: a subject means something only within it
    ins: str | None = None  # patients: their INS
    organization: str | None = None  # professionals and system clients
    emergency: bool = False  # professionals holding an emergency role (SAMU, centre 15)
    study: str | None = None  # link sessions: the one study they may see
    link: str | None = None  # link sessions: the link's id
    # System clients: the issuer that names their organization (``Issuer.organizations_of``).
    namespace: str | None = None

    @property
    def key(self) -> str:
        """Who this is, everywhere something is kept for a caller (links made, emergency accesses):
        (issuer, subject), never a bare subject. A patient whose subject at the portal equals a
        professional's RPPS at Pro Santé Connect is someone else."""
        return f"{self.issuer}|{self.actor}" if self.issuer else self.actor

    @property
    def consents(self) -> bool:
        """Does what this caller sees come from patients' grants (professionals and system
        clients), checked at each use?"""
        return self.role in ("professional", "system")

    @property
    def grantee_keys(self) -> tuple[str, ...]:
        """What a patient's grant may name to reach this caller. A professional: them or their
        organization, each as named by their issuer. A system client: its organization only (a
        grant is made to people or to organizations, never to a piece of software), as named by
        the issuer its organizations belong to."""
        if self.role == "system":
            namespace = self.namespace or self.issuer or ""
            return (grantee_key("org", namespace, self.organization),) if self.organization else ()
        keys = [grantee_key("pro", self.issuer or "", self.actor)]
        if self.organization:
            keys.append(grantee_key("org", self.issuer or "", self.organization))
        return tuple(keys)


def grantee_key(kind: str, issuer: str, identifier: str) -> str:
    """How a grant names its grantee: ``pro:<issuer>|<RPPS>`` or ``org:<issuer>|<FINESS>``."""
    return f"{kind}:{issuer}|{identifier}"


OPEN = Principal(role="open", actor="anonymous")
ANONYMOUS = Principal(role="anonymous", actor="anonymous")


class _Key(NamedTuple):
    jwk: PyJWK
    algorithms: list[str]  # what this key may verify: its own ``alg``, or those of its type


@dataclass
class _Fetch:
    """One fetch of an issuer's keys, in flight in its own thread until ``done``."""

    deadline: float  # time.monotonic() by which callers stop waiting for it
    seconds: float  # the deadline as configured, for messages
    done: threading.Event = field(default_factory=threading.Event)
    error: Unauthenticated | None = None  # why it failed, once done


@dataclass
class _KeySet:
    """What is known of one issuer's keys. Changed only under the ``Authenticator``'s lock."""

    keys: dict[str, _Key] = field(default_factory=dict)  # by kid ("" for a key without one)
    loaded: float = -math.inf  # time.monotonic() of the last successful fetch
    raw: bytes | None = None  # jwks_file: the bytes ``keys`` were read from
    fetch: _Fetch | None = None  # the one fetch in flight, if any
    failing: bool = False  # the last fetch failed
    failed_until: float = -math.inf  # no fetch before this time.monotonic(), after a failure
    error: str = ""  # why the last fetch failed: a refusal's message

    def find(self, kid: str | None) -> _Key | None:
        if kid is None:  # a token naming no key: only a set of one says which
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._issuers = {issuer.issuer: issuer for issuer in config.issuers}
        self._keysets = {issuer.issuer: _KeySet() for issuer in config.issuers}
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._lock = threading.Lock()

    def remembered(self, token: str) -> Principal | None:
        """The principal of a token verified before and not expired yet; never blocks (the event
        loop asks this first, and runs ``principal`` in a worker thread only when it says None)."""
        with self._lock:
            remembered = self._verified.get(token)
        if remembered is not None and remembered[1] > time.time():
            return remembered[0]
        return None

    def principal(self, token: str) -> Principal:
        """The principal of a bearer token; ``Unauthenticated`` (401) says why one is refused.
        May wait for the issuer's keys (at most the fetch deadline, 5 s): call it from a worker
        thread, not the event loop."""
        remembered = self.remembered(token)
        if remembered is not None:
            return remembered
        claims, issuer = self._verify(token)
        principal = _principal(claims, issuer)
        with self._lock:
            self._verified[token] = (principal, float(claims["exp"]) + issuer.leeway)
            while len(self._verified) > _REMEMBERED:
                self._verified.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[dict[str, Any], Issuer]:
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"bearer token is not a JWT ({exc})") from exc
        issuer = self._issuers.get(str(unverified.get("iss")))
        if issuer is None:
            raise Unauthenticated(f"bearer token issuer {_shown(unverified.get('iss'))} is not trusted here")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > _MAX_KID):
            raise Unauthenticated(f"bearer token key id (kid) must be a string of at most {_MAX_KID} chars")
        key = self._key(issuer, kid)
        try:
            claims = jwt.decode(
                token,
                key.jwk.key,
                algorithms=key.algorithms,
                audience=issuer.audience,
                issuer=issuer.issuer,
                leeway=issuer.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("bearer token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthenticated("bearer token is not valid yet (nbf/iat in the future)") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated(
                f"bearer token is not meant for this gateway (aud must be {issuer.audience!r})"
            ) from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"bearer token refused: {exc}") from exc
        return claims, issuer

    def _key(self, issuer: Issuer, kid: str | None) -> _Key:
        keyset = self._keysets[issuer.issuer]
        if issuer.jwks_file is not None:
            return self._file_key(issuer, keyset, kid)
        return self._fetched_key(issuer, keyset, kid)

    def _file_key(self, issuer: Issuer, keyset: _KeySet, kid: str | None) -> _Key:
        with self._lock:
            key = keyset.find(kid)
        if key is not None:
            return key
        # A key the file lacks: read it again (a local file, a few KB) and parse it only if it changed,
        # so that keys rotated by rewriting the file are picked up at once.
        assert issuer.jwks_file is not None
        try:
            raw = issuer.jwks_file.read_bytes()
        except OSError as exc:
            raise Unauthenticated(
                f"keys of issuer {issuer.issuer} unavailable ({issuer.jwks_file}: {exc.strerror})"
            ) from exc
        with self._lock:
            changed = raw != keyset.raw
        if changed:
            keys = _parse_jwks(raw, issuer)
            with self._lock:
                keyset.keys, keyset.raw = keys, raw
        with self._lock:  # looked up again: another thread may have read the file meanwhile
            key = keyset.find(kid)
        if key is None:
            raise _missing(issuer, kid)
        return key

    def _fetched_key(self, issuer: Issuer, keyset: _KeySet, kid: str | None) -> _Key:
        with self._lock:
            now = time.monotonic()
            if now < keyset.loaded + _LIFETIME:
                key = keyset.find(kid)
                if key is not None:
                    return key
                if now < keyset.loaded + _REFRESH:
                    raise _missing(issuer, kid)  # the set is seconds old: a made-up or retired key
            fetch = keyset.fetch
            if fetch is None:
                if now < keyset.failed_until:
                    wait = keyset.failed_until - now
                    raise Unauthenticated(f"{keyset.error}; not fetched again for {wait:.0f} s")
                fetch = keyset.fetch = _Fetch(deadline=now + _DEADLINE, seconds=_DEADLINE)
                try:
                    threading.Thread(
                        target=self._fetch, args=(issuer, keyset, fetch), name="jwks-fetch", daemon=True
                    ).start()
                except RuntimeError as exc:  # no thread to be had: no fetch in flight either
                    keyset.fetch = None
                    raise Unauthenticated(f"keys of issuer {issuer.issuer} unavailable ({exc})") from exc
            elif keyset.failing or now >= fetch.deadline:
                # Nobody but its starter waits for a retry of an issuer whose last fetch failed (or for
                # a fetch past its deadline): an identity provider that is down would otherwise hold
                # every identity thread of the gateway for a deadline at each retry.
                late = f"keys of issuer {issuer.issuer} unavailable (no answer from its JWKS endpoint yet)"
                raise Unauthenticated(f"{keyset.error if keyset.failing else late}; being fetched again")
        # Others wait for the fetch in flight rather than being refused: at start-up or after a
        # rotation, a viewer's parallel requests with a new token all need the keys that this one
        # fetch of a healthy issuer brings in milliseconds. A second fetch is never started, and
        # nobody waits past the fetch's deadline.
        if not fetch.done.wait(max(0.0, fetch.deadline - time.monotonic())):
            raise Unauthenticated(
                f"keys of issuer {issuer.issuer} unavailable (no answer from its JWKS endpoint within "
                f"{fetch.seconds:g} s)"
            )
        if fetch.error is not None:
            raise Unauthenticated(fetch.error.message) from fetch.error
        with self._lock:
            key = keyset.find(kid)
        if key is None:
            raise _missing(issuer, kid)
        return key

    def _fetch(self, issuer: Issuer, keyset: _KeySet, fetch: _Fetch) -> None:
        """The body of a fetch's thread: whatever happens, the issuer is left with no fetch in flight."""
        keys: dict[str, _Key] | None = None
        error = Unauthenticated(f"keys of issuer {issuer.issuer} unavailable (the fetch did not complete)")
        try:
            keys = _retrieve_jwks(issuer, fetch.deadline)
        except Unauthenticated as exc:
            error = exc
        except Exception as exc:  # a bug here must not leave the issuer with a fetch that never ends
            log.exception("keys of issuer %s: fetch failed", issuer.issuer)
            error = Unauthenticated(f"keys of issuer {issuer.issuer} unavailable ({type(exc).__name__})")
        finally:
            with self._lock:
                keyset.fetch = None
                keyset.failing = keys is None
                if keys is not None:
                    keyset.keys, keyset.loaded = keys, time.monotonic()
                else:
                    keyset.error, keyset.failed_until = error.message, time.monotonic() + _COOLDOWN
                    fetch.error = error
            fetch.done.set()
        if keys is None:
            log.warning("%s; its tokens needing new keys are refused for %g s", error.message, _COOLDOWN)
        else:
            log.info("keys of issuer %s: %d fetched", issuer.issuer, len(keys))


def _retrieve_jwks(issuer: Issuer, deadline: float) -> dict[str, _Key]:
    """One GET of the issuer's JWKS, complete by ``deadline`` (time.monotonic()). Redirects are not
    followed: the configured URL is the one trusted to publish the issuer's keys."""
    assert issuer.jwks_url is not None
    unavailable = f"keys of issuer {issuer.issuer} unavailable"
    remaining = max(0.01, deadline - time.monotonic())
    timeout = httpx.Timeout(remaining, connect=min(_CONNECT, remaining))
    body = bytearray()
    try:
        with (
            httpx.Client(timeout=timeout) as http,
            http.stream("GET", issuer.jwks_url, headers={"Accept": "application/json"}) as response,
        ):
            if response.status_code != 200:
                status = response.status_code
                raise Unauthenticated(f"{unavailable} (its JWKS endpoint answered HTTP {status})")
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > _MAX_JWKS:
                    raise Unauthenticated(f"{unavailable} (its JWKS is larger than {_MAX_JWKS} bytes)")
                if time.monotonic() > deadline:  # each read has a timeout; the whole answer too
                    raise Unauthenticated(f"{unavailable} (its JWKS took longer than {_DEADLINE:g} s)")
    except httpx.HTTPError as exc:
        raise Unauthenticated(f"{unavailable} ({type(exc).__name__}: {exc})") from exc
    return _parse_jwks(bytes(body), issuer)


def _parse_jwks(raw: bytes, issuer: Issuer) -> dict[str, _Key]:
    """The signing keys of a JWK set (RFC 7517 5), by kid. Each key is built on its own rather than
    with ``jwt.PyJWKSet``: the raw JWK says which algorithms the key may verify, and a key of no use
    here (an encryption key, an unsupported type) is skipped whatever the PyJWT version (before 2.5,
    ``PyJWKSet`` refused a whole set for one such key, as identity providers publish beside their
    signing keys)."""
    unusable = f"keys of issuer {issuer.issuer} unavailable"
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise Unauthenticated(f"{unusable} (its JWKS is not JSON: {exc})") from exc
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise Unauthenticated(f"{unusable} (its JWKS has no 'keys' list)")
    keys: dict[str, _Key] = {}
    for entry in entries[:_MAX_KEYS]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        algorithms = _algorithms_of(entry)
        if not algorithms:
            continue
        try:  # the algorithm given: before 2.1, PyJWK could not tell it from the key type
            jwk = PyJWK(entry, algorithms[0])
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, NotImplementedError):
            continue  # malformed members, or a key type this PyJWT cannot build
        kid = entry.get("kid")
        keys.setdefault(kid if isinstance(kid, str) else "", _Key(jwk, algorithms))
    if not keys:
        raise Unauthenticated(f"{unusable} (its JWKS holds no signing key usable here)")
    return keys


def _algorithms_of(jwk: dict[str, Any]) -> list[str]:
    """The algorithms a key may verify: its ``alg``, or else those of its type (RFC 7518 3). Never
    HMAC: a public key must not become a shared secret (algorithm confusion)."""
    alg, kty, crv = jwk.get("alg"), jwk.get("kty"), jwk.get("crv")
    if alg is not None:
        return [alg] if isinstance(alg, str) and alg in _ALGORITHMS else []
    if kty == "RSA":
        return [a for a in _ALGORITHMS if a.startswith(("RS", "PS"))]
    if kty == "EC" and isinstance(crv, str) and crv in _CURVES:
        return [_CURVES[crv]]
    if kty == "OKP" and crv in ("Ed25519", "Ed448"):
        return ["EdDSA"]
    return []


def _missing(issuer: Issuer, kid: str | None) -> Unauthenticated:
    if kid is None:
        return Unauthenticated(f"bearer token names no key (kid) and {issuer.issuer} has several")
    return Unauthenticated(f"bearer token key {kid!r} is not among {issuer.issuer}'s keys")


def _shown(value: object) -> str:
    """A token's own value in a refusal (which is logged and audited): quoted, and bounded."""
    shown = repr(value)
    return shown if len(shown) <= _SHOWN else f"{shown[: _SHOWN - 1]}…"


def _principal(claims: dict[str, Any], issuer: Issuer) -> Principal:
    actor = claims.get(issuer.id_claim)
    if not isinstance(actor, str) or not actor:
        raise Unauthenticated(f"bearer token lacks the {issuer.id_claim!r} claim")
    if issuer.role == "patient":
        ins = claims.get(issuer.ins_claim)
        if not isinstance(ins, str) or not ins:
            raise Unauthenticated(f"patient token lacks the {issuer.ins_claim!r} claim (the patient's INS)")
        return Principal(role="patient", actor=actor, issuer=issuer.issuer, ins=ins)
    if issuer.role == "system":
        # A client acts for its organization: without one, no grant could ever reach it.
        organization = claims.get(issuer.organization_claim)
        if not isinstance(organization, str | int) or isinstance(organization, bool) or not str(organization):
            raise Unauthenticated(
                f"system token lacks the {issuer.organization_claim!r} claim (the organization it acts for)"
            )
        return Principal(
            role="system",
            actor=actor,
            issuer=issuer.issuer,
            organization=str(organization),
            namespace=issuer.organizations_of,
        )
    roles = claims.get(issuer.roles_claim) or []
    roles = [roles] if isinstance(roles, str) else [str(r) for r in roles if isinstance(r, str | int)]
    organization = claims.get(issuer.organization_claim)
    return Principal(
        role="professional",
        actor=actor,
        issuer=issuer.issuer,
        organization=str(organization) if organization else None,
        emergency=any(role in issuer.emergency_roles for role in roles),
    )
