"""[auth]: who is let in (OpenID Connect issuers and the roles of their tokens), or nobody asked
(an open demo), and the lifetimes of what access hands out."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config.values import only, seconds, typed
from gateway.errors import ConfigError

__all__ = ["Issuer", "AuthConfig", "is_loopback", "read_auth"]


@dataclass(frozen=True)
class Issuer:
    """An OpenID Connect issuer whose bearer JWTs are accepted (PSC for professionals, the
    portal for patients). Roles and identifiers are read from the configured claims."""

    issuer: str
    audience: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    # The role of this issuer's tokens: "professional", "patient", or "system": software (an EHR,
    # a RIS) with its own credentials, an OAuth 2.0 client-credentials token (RFC 6749 4.4) whose
    # subject is the client (RFC 9068 2.2), acting for the organization the token names.
    role: str = "professional"
    id_claim: str = "sub"  # the professional's id (RPPS) or the patient's subject
    ins_claim: str = "ins"  # patients: their INS
    organization_claim: str = "organization"  # professionals: their organization (FINESS)
    roles_claim: str = "roles"  # a list (or string) of role names in the token
    emergency_roles: tuple[str, ...] = ()  # role names that may open emergency access
    leeway: float = 30.0  # seconds of clock skew allowed on exp / nbf / iat
    # System issuers: the professional issuer whose organization identifiers this one's
    # organization claims are (a patient's grant to "org:<that issuer>|<FINESS>" then reaches the
    # organization's software too); None: its own.
    organizations_of: str | None = None


@dataclass(frozen=True)
class AuthConfig:
    open: bool = False  # no authentication at all: everyone sees everything (demo only)
    open_beyond_loopback: bool = False  # let an open gateway listen on other than loopback
    issuers: tuple[Issuer, ...] = ()
    emergency_minutes: float = 240.0  # how long an emergency access lasts
    session_minutes: float = 30.0  # a study link's session cookie lifetime (at most the link's)
    max_link_days: float = 90.0  # the longest expires_in a link may ask for
    cors_origins: tuple[str, ...] = ()  # viewer origins allowed to call the gateway


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_ISSUER_KEYS = {
    "issuer", "audience", "jwks_url", "jwks_file", "role", "id_claim", "ins_claim",
    "organization_claim", "roles_claim", "emergency_roles", "leeway", "organizations_of",
}  # fmt: skip
_ROLES = ("professional", "patient", "system")  # of an issuer's tokens


def read_auth(table: dict[str, Any], base: Path) -> AuthConfig:
    only(
        table,
        "auth",
        {"open", "open_beyond_loopback", "issuers", "emergency_minutes", "session_minutes",
         "max_link_days", "cors_origins"},
    )  # fmt: skip
    open_ = table.get("open", False)
    if not isinstance(open_, bool):
        raise ConfigError(f"auth.open: expected true or false, got {open_!r}")
    beyond = table.get("open_beyond_loopback", False)
    if not isinstance(beyond, bool):
        raise ConfigError(f"auth.open_beyond_loopback: expected true or false, got {beyond!r}")
    issuers_raw = table.get("issuers", [])
    if not isinstance(issuers_raw, list):
        raise ConfigError("auth.issuers: must be an array of tables ([[auth.issuers]])")
    issuers = tuple(_issuer(item, f"auth.issuers[{i}]", base) for i, item in enumerate(issuers_raw))
    if not open_ and not issuers:
        raise ConfigError(
            "auth: no issuer configured; add [[auth.issuers]] (OpenID Connect), or set auth.open = true "
            "for a demo without authentication"
        )
    professionals = {i.issuer for i in issuers if i.role == "professional"}
    for i, item in enumerate(issuers):
        if item.organizations_of is not None and item.organizations_of not in professionals:
            raise ConfigError(
                f"auth.issuers[{i}].organizations_of: {item.organizations_of!r} is not a configured "
                "professional issuer"
            )
    origins = typed(table, "auth.cors_origins", list, [])
    if not all(isinstance(origin, str) for origin in origins):
        raise ConfigError("auth.cors_origins: expected a list of origins (https://viewer.example)")
    return AuthConfig(
        open=open_,
        open_beyond_loopback=beyond,
        issuers=issuers,
        emergency_minutes=seconds(table, "auth.emergency_minutes", AuthConfig.emergency_minutes),
        session_minutes=seconds(table, "auth.session_minutes", AuthConfig.session_minutes),
        max_link_days=seconds(table, "auth.max_link_days", AuthConfig.max_link_days),
        cors_origins=tuple(origin.rstrip("/") for origin in origins),
    )


def _issuer(item: Any, where: str, base: Path) -> Issuer:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    only(item, where, _ISSUER_KEYS)
    issuer = typed(item, f"{where}.issuer", str, None)
    audience = typed(item, f"{where}.audience", str, None)
    if not issuer or not audience:
        raise ConfigError(f"{where}: issuer and audience are both needed")
    jwks_url = typed(item, f"{where}.jwks_url", str, None)
    jwks_file = typed(item, f"{where}.jwks_file", str, None)
    if (jwks_url is None) == (jwks_file is None):
        raise ConfigError(f"{where}: give one of jwks_url (the issuer's keys) or jwks_file (offline)")
    role = typed(item, f"{where}.role", str, "professional")
    if role not in _ROLES:
        raise ConfigError(f"{where}.role: {role!r} is not one of {', '.join(_ROLES)}")
    organizations_of = typed(item, f"{where}.organizations_of", str, None)
    if organizations_of is not None and role != "system":
        raise ConfigError(f'{where}.organizations_of: only for a system issuer (role = "system")')
    emergency = typed(item, f"{where}.emergency_roles", list, [])
    strings = {key: typed(item, f"{where}.{key}", str, getattr(Issuer, key)) for key in (
        "id_claim", "ins_claim", "organization_claim", "roles_claim")}  # fmt: skip
    file_path = None
    if jwks_file is not None:
        file_path = Path(jwks_file) if Path(jwks_file).is_absolute() else base / jwks_file
    return Issuer(
        issuer=issuer,
        audience=audience,
        jwks_url=jwks_url,
        jwks_file=file_path,
        role=role,
        emergency_roles=tuple(str(name) for name in emergency),
        leeway=float(typed(item, f"{where}.leeway", (int, float), 30.0)),
        organizations_of=organizations_of,
        **strings,
    )
