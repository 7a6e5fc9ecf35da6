"""Around every request: who is calling, one audit record when it ends, CORS and security headers.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which buffers nothing but costs a task and
a stream per request, on the frame path too. The record is written when the response ends (or the
client hangs up), so it holds the status, the body bytes actually sent, and whether the body was
complete.

Every request gets exactly one record, refusals decided here included, but for the health probe,
the viewer's files and CORS preflights (none of them touches patient data). The action comes
from the method and path (``_ACTIONS``), so a new route is audited without doing anything.
Handlers add what only they know to ``scope["state"]["audit"]`` (the patients whose data the
response carried, the source used, emergency rules). A record names a patient only for an
authenticated caller: nobody can write into a patient's history without credentials.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from http.cookies import SimpleCookie
from typing import Any

import anyio
import anyio.to_thread
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import urls
from gateway.access.audit_record import AuditRecord
from gateway.access.control import SESSION_COOKIE, Access
from gateway.access.identity import ANONYMOUS, Principal
from gateway.errors import GatewayError
from gateway.redact import escape, redact

__all__ = ["AccessMiddleware", "audit_of", "logged_path"]

log = logging.getLogger("gateway.http")

# (method, path, action): the first that matches names the request's action; "other" otherwise.
# The paths are gateway/urls.py's templates, so a route and its action cannot drift apart; "/?$"
# takes a collection with a trailing slash too (Starlette redirects it), under a study any path.
_ACTIONS = [
    (None, urls.QIDO_PATH, "query"),
    (None, urls.pattern(urls.DICOMWEB + urls.STUDY, "(/.*)?" + re.escape(urls.METADATA) + "$"), "metadata"),
    (None, urls.pattern(urls.DICOMWEB + urls.STUDY, "(/.*)?$"), "retrieve"),
    ("POST", urls.pattern(urls.LINKS, "/?$"), "link.create"),
    ("GET", urls.pattern(urls.LINKS, "/?$"), "link.list"),
    ("DELETE", urls.pattern(urls.LINK), "link.revoke"),
    (None, urls.pattern(urls.LINK_USE_PREFIX, ""), "link.use"),
    ("POST", urls.pattern(urls.GRANTS, "/?$"), "grant.create"),
    ("GET", urls.pattern(urls.GRANTS, "/?$"), "grant.list"),
    ("DELETE", urls.pattern(urls.GRANT), "grant.revoke"),
    ("POST", urls.pattern(urls.HIDDEN, "/?$"), "study.hide"),
    ("GET", urls.pattern(urls.HIDDEN, "/?$"), "hidden.list"),
    ("DELETE", urls.pattern(urls.HIDDEN_STUDY), "study.unhide"),
    ("POST", urls.pattern(urls.EMERGENCY, "/?$"), "emergency.open"),
    ("GET", urls.pattern(urls.EMERGENCY, "/?$"), "emergency.list"),
    ("GET", urls.pattern(urls.AUDIT, "/?$"), "audit.read"),
    ("POST", urls.pattern(urls.SUBSCRIPTIONS, "/?$"), "subscription.create"),
    ("GET", urls.pattern(urls.SUBSCRIPTIONS, "/?$"), "subscription.list"),
    ("DELETE", urls.pattern(urls.SUBSCRIPTION), "subscription.revoke"),
    ("GET", urls.pattern(urls.CHANGES, "/?$"), "changes.read"),
    ("GET", urls.pattern(urls.FHIR_IMAGING_STUDIES, "/?$"), "fhir.search"),
    ("GET", urls.pattern(urls.FHIR_IMAGING_STUDY), "fhir.read"),
    ("GET", urls.pattern(urls.PRIORS, "/?$"), "priors.list"),
    (None, urls.pattern(urls.IID, "/?$"), "viewer.open"),
]
_SECURITY = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # link secrets and UIDs never leave in a Referer
    (b"x-frame-options", b"SAMEORIGIN"),
]
_SESSIONLESS = (urls.LINK_USE_PREFIX, urls.VIEWER, urls.HEALTH)
# Patient data and the API's answers are never kept by a shared cache (a proxy, a CDN) nor
# written to a browser's disk cache: every read is checked against the policy and audited.
_NO_STORE = [(b"cache-control", b"no-store")]
_UNAUDITED = (urls.HEALTH, urls.VIEWER)  # probes and static files: no patient data
_AUTH_THREADS = 8  # worker threads for identity checks (key fetches, session reads)


def audit_of(scope: Scope) -> dict[str, Any]:
    """What a handler knows about the request for its audit record (patients, source, ...)."""
    return scope.setdefault("state", {}).setdefault("audit", {})


def action_of(method: str, path: str) -> str:
    """The audit action of a request."""
    for wanted, pattern, action in _ACTIONS:
        if (wanted is None or wanted == method) and pattern.match(path):
            return action
    return "other"


def logged_path(path: str) -> str:
    """A request path as it may appear in a log line or an audit record: no secret, one line."""
    return escape(redact(path), 512)


class AccessMiddleware:
    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access
        self.starlette: Any = None  # set by create_app: the application's route table
        self._limiters: dict[str, anyio.CapacityLimiter] = {}  # per issuer (Access.pool_of)
        self.origins = set(access.config.cors_origins)
        hsts = access.server.hsts_seconds
        self._hsts = [(b"strict-transport-security", f"max-age={hsts}".encode())] if hsts else []

    async def _principal(self, authorization: str | None, session: str | None) -> Principal:
        """Who is calling, without blocking the event loop: a token seen before is a lookup;
        anything else (keys to fetch, a session to read) runs in a worker thread of a pool of its
        own per issuer, so an identity provider that hangs cannot take the threads that serve data,
        nor those that check another issuer's tokens or a link's session."""
        known = self.access.remembered(authorization, session)
        if known is not None:
            return known
        pool = self.access.pool_of(authorization)
        limiter = self._limiters.get(pool)
        if limiter is None:
            limiter = self._limiters[pool] = anyio.CapacityLimiter(_AUTH_THREADS)
        return await anyio.to_thread.run_sync(self.access.principal, authorization, session, limiter=limiter)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.time()
        path: str = scope["path"]
        request_id = secrets.token_hex(8)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        extra = [(b"x-request-id", request_id.encode())] + _SECURITY
        origin = headers.get("origin")
        if origin and origin.rstrip("/") in self.origins:
            extra += [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin"),
                (b"access-control-expose-headers", b"Warning, X-Request-ID, Content-Length, Content-Type"),
            ]
            if scope["method"] == "OPTIONS":  # a CORS preflight: answered here, before any auth
                preflight = PlainTextResponse("", status_code=204, headers={
                    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization, Accept, Content-Type",
                    "Access-Control-Max-Age": "600",
                })  # fmt: skip
                preflight.raw_headers += extra
                await preflight(scope, receive, send)
                return
        if not path.startswith(_UNAUDITED):
            extra += _NO_STORE
        if scope.get("scheme") == "https":  # as the trusted proxy said, or a TLS listener
            extra += self._hsts
        state = scope.setdefault("state", {})
        sent = {"status": 0, "bytes": 0, "complete": False}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message["headers"] = list(message.get("headers", [])) + extra
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    sent["complete"] = True
            await send(message)

        # A link's session matters for data only: an old cookie must not stand in the way of the
        # viewer's files, a health probe, or opening another link.
        session = None if path.startswith(_SESSIONLESS) else _session(headers.get("cookie"))
        try:
            principal = await self._principal(headers.get("authorization"), session)
        except GatewayError as exc:
            principal = ANONYMOUS
            state["principal"] = principal
            response = PlainTextResponse(exc.message + "\n", status_code=exc.status)
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="gateway"'
            log.info("%s %s -> %d: %s", scope["method"], logged_path(path), exc.status, exc.message)
            await response(scope, receive, send_with_headers)
            self._record(scope, principal, request_id, started, sent, exc.message)
            return
        state["principal"] = principal
        state["request_id"] = request_id
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self._record(scope, principal, request_id, started, sent, None)

    def _record(
        self,
        scope: Scope,
        principal: Principal,
        request_id: str,
        started: float,
        sent: dict[str, Any],
        refusal: str | None,
    ) -> None:
        path: str = scope["path"]
        if path.startswith(_UNAUDITED):
            return
        noted = audit_of(scope)
        status = sent["status"] or 499  # the client hung up before any response started
        if status >= 400:
            outcome = "denied" if status in (401, 403, 404) else "error"
        else:
            outcome = "success" if sent["complete"] else "incomplete"
        study = noted.get("study") or (m.group(1) if (m := urls.STUDY_PATH.match(path)) else None)
        patients: list[str] = []
        if principal.role != "anonymous":  # unauthenticated noise never enters a history
            patients = [p for p in (noted.get("patient"), *noted.get("patients", ())) if p]
            if principal.role == "patient" and not patients:
                patients = [principal.ins or ""]
        client = scope.get("client")
        record = AuditRecord(
            time=started,
            request_id=request_id,
            actor=principal.actor,
            role="emergency" if noted.get("emergency") else principal.role,
            action=action_of(scope["method"], path),
            outcome=outcome,
            status=status,
            study=study,
            organization=principal.organization,
            emergency=bool(noted.get("emergency")),
            reason=noted.get("reason") or refusal or noted.get("refusal"),
            source=noted.get("source"),
            bytes_sent=sent["bytes"],
            client=client[0] if client else None,
            path=path,  # AuditRecord redacts (no link secret) and bounds it
            ended=time.time(),
            issuer=principal.issuer,
            patients=tuple(patients),
        )
        self.access.audit.append(record)


def _session(cookie_header: str | None) -> str | None:
    if not cookie_header or SESSION_COOKIE not in cookie_header:
        return None
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(cookie_header)
    except Exception:  # a malformed Cookie header is not a session
        return None
    morsel = cookies.get(SESSION_COOKIE)
    return morsel.value if morsel else None
