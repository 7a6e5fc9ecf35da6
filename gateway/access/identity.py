"""Who is calling: bearer JWTs from configured OpenID Connect issuers, turned into a ``Principal``.

A token is accepted when its signature verifies with a key of its issuer's JWKS (by ``kid``), and
``iss``, ``aud``, ``exp`` and ``nbf`` hold (with the issuer's leeway for clock skew). PyJWT does the
checking; its ``PyJWKClient`` caches the issuer's keys and fetches them again when a token names a
key it does not know (key rotation). Verified tokens are remembered until they expire, so a viewer
sending the same token with every frame costs one dictionary lookup, not a signature check.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient

from gateway.config import AuthConfig, Issuer
from gateway.errors import Unauthenticated

__all__ = ["Principal", "Authenticator", "OPEN", "ANONYMOUS"]

_REFRESH = 10.0  # seconds between forced fetches of an issuer's keys
_REMEMBERED = 4096  # verified tokens kept (until they expire)
_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


@dataclass(frozen=True)
class Principal:
    """The caller. ``role`` is "patient", "professional", "link", "open" or "anonymous"."""

    role: str
    actor: str  # RPPS / patient subject / "link:<id>" / "anonymous"
    ins: str | None = None  # patients: their INS
    organization: str | None = None  # professionals
    emergency: bool = False  # professionals holding an emergency role (SAMU, centre 15)
    study: str | None = None  # link sessions: the one study they may see
    link: str | None = None  # link sessions: the link's id

    @property
    def grantee_keys(self) -> tuple[str, ...]:
        """What a patient's grant may name to reach this professional: them or their organization."""
        keys = [f"pro:{self.actor}"]
        if self.organization:
            keys.append(f"org:{self.organization}")
        return tuple(keys)


OPEN = Principal(role="open", actor="anonymous")
ANONYMOUS = Principal(role="anonymous", actor="anonymous")


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._issuers = {issuer.issuer: issuer for issuer in config.issuers}
        self._clients: dict[str, PyJWKClient] = {}
        self._files: dict[str, dict[str, PyJWK]] = {}
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._lock = threading.Lock()

    def principal(self, token: str) -> Principal:
        """The principal of a bearer token; ``Unauthenticated`` (401) says why one is refused."""
        now = time.time()
        with self._lock:
            remembered = self._verified.get(token)
        if remembered is not None and remembered[1] > now:
            return remembered[0]
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
            raise Unauthenticated(f"bearer token issuer {unverified.get('iss')!r} is not trusted here")
        key = self._key(issuer, header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name] if key.algorithm_name in _ALGORITHMS else _ALGORITHMS,
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

    def _key(self, issuer: Issuer, kid: str | None) -> PyJWK:
        try:
            if issuer.jwks_file is not None:
                keys = self._files.get(issuer.issuer)
                if keys is None or (kid not in keys):
                    data = json.loads(issuer.jwks_file.read_text(encoding="utf-8"))
                    keys = {k.key_id or "": k for k in jwt.PyJWKSet.from_dict(data).keys}
                    self._files[issuer.issuer] = keys
                if kid is None and len(keys) == 1:
                    return next(iter(keys.values()))
                if kid not in keys:
                    raise Unauthenticated(f"bearer token key {kid!r} is not among {issuer.issuer}'s keys")
                return keys[kid]
            assert issuer.jwks_url is not None
            client = self._clients.get(issuer.issuer)
            if client is None:
                # Keys cached for 5 minutes; an unknown kid fetches the set again (rotation), at
                # most every _REFRESH seconds, so tokens naming made-up keys cannot flood the issuer.
                client = PyJWKClient(
                    issuer.jwks_url, cache_jwk_set=True, lifespan=300, timeout=5, cooldown_duration=_REFRESH
                )
                self._clients[issuer.issuer] = client
            return client.get_signing_key(kid) if kid else client.get_signing_keys()[0]
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise Unauthenticated(f"keys of issuer {issuer.issuer} unavailable or unusable ({exc})") from exc


def _principal(claims: dict[str, Any], issuer: Issuer) -> Principal:
    actor = claims.get(issuer.id_claim)
    if not isinstance(actor, str) or not actor:
        raise Unauthenticated(f"bearer token lacks the {issuer.id_claim!r} claim")
    if issuer.role == "patient":
        ins = claims.get(issuer.ins_claim)
        if not isinstance(ins, str) or not ins:
            raise Unauthenticated(f"patient token lacks the {issuer.ins_claim!r} claim (the patient's INS)")
        return Principal(role="patient", actor=actor, ins=ins)
    roles = claims.get(issuer.roles_claim) or []
    roles = [roles] if isinstance(roles, str) else [str(r) for r in roles if isinstance(r, str | int)]
    organization = claims.get(issuer.organization_claim)
    return Principal(
        role="professional",
        actor=actor,
        organization=str(organization) if organization else None,
        emergency=any(role in issuer.emergency_roles for role in roles),
    )
