"""Access control assembled: who is calling (identity), what they may see (policy), what patients
decided and what happened (store, audit log)."""

from __future__ import annotations

import logging
import time

import jwt

from gateway.access.audit import AuditLog
from gateway.access.identity import ANONYMOUS, OPEN, Authenticator, Principal
from gateway.access.policy import Policy
from gateway.access.store import AccessStore
from gateway.config import Config
from gateway.errors import Unauthenticated
from gateway.registry.store import Registry

__all__ = ["Access", "SESSION_COOKIE"]

log = logging.getLogger("gateway.access")

SESSION_COOKIE = "gateway_session"  # a study link's session (HttpOnly, SameSite=Strict)


class Access:
    def __init__(self, config: Config, registry: Registry) -> None:
        self.config = config.auth
        self.server = config.server
        self._issuers = {issuer.issuer for issuer in config.auth.issuers}
        self.store = AccessStore(config.access_database)
        professionals = [i.issuer for i in config.auth.issuers if i.role == "professional"]
        if len(professionals) == 1 and (count := self.store.qualify_grantees(professionals[0])):
            log.info("access: %d grants now name their grantee within %s", count, professionals[0])
        self.authenticator = Authenticator(config.auth)
        self.policy = Policy(self.store, registry)
        self.audit = AuditLog(self.store)
        if self.config.open:
            log.warning(
                "OPEN ACCESS: authentication is off (auth.open = true); every caller sees every study. "
                "For a demo on loopback only."
            )

    def remembered(self, authorization: str | None, session: str | None) -> Principal | None:
        """The caller when that needs no I/O (no credentials, or a token verified before); None
        when ``principal`` must be asked, in a worker thread (it may fetch keys or read sessions)."""
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer" and token.strip() and self.config.issuers:
                return self.authenticator.remembered(token.strip())
            return None
        if session:
            return None
        return OPEN if self.config.open else ANONYMOUS

    def pool_of(self, authorization: str | None) -> str:
        """Which identity worker pool a request that needs one waits in: one per configured
        issuer (named by the token's unverified ``iss``), one for link sessions, one for the rest,
        so that an identity provider that hangs holds up its own tokens only."""
        if not authorization:
            return "session"
        try:
            issuer = jwt.decode(authorization.partition(" ")[2].strip(), options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, TypeError):
            return "other"
        named = issuer.get("iss") if isinstance(issuer, dict) else None
        return named if isinstance(named, str) and named in self._issuers else "other"

    def principal(self, authorization: str | None, session: str | None) -> Principal:
        """The caller, from an ``Authorization: Bearer`` header or a link's session cookie."""
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("Authorization must be 'Bearer <token>'")
            if not self.config.issuers:
                if self.config.open:
                    return OPEN  # a demo client sending a token anyway
                raise Unauthenticated("no token issuer is configured")
            return self.authenticator.principal(token.strip())
        if session:
            link = self.store.session_link(session, time.time())
            if link is None:
                raise Unauthenticated("the study link's session has expired or the link was revoked")
            return Principal(
                role="link",
                actor=f"link:{link['id']}",
                ins=link["patient"],
                study=link["StudyInstanceUID"],
                link=link["id"],
            )
        return OPEN if self.config.open else ANONYMOUS

    def close(self) -> None:
        self.audit.flush()
        self.store.close()
