"""Around every request: who is calling, one audit record when it ends, CORS and security headers.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which buffers nothing but costs a task and
a stream per request, on the frame path too. The record is written when the response ends (or the
client hangs up), so it holds the status and the body bytes actually sent.

Handlers add what only they know to ``scope["state"]["audit"]`` (the patient, the source used,
emergency rules); the action and the study come from the path here.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from http.cookies import SimpleCookie
from typing import Any

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.access.identity import Principal
from gateway.access.record import AuditRecord
from gateway.access.service import SESSION_COOKIE, Access
from gateway.errors import GatewayError

__all__ = ["AccessMiddleware", "audit_of"]

log = logging.getLogger("gateway.http")

_STUDY = re.compile(r"^/dicom-web/studies/([^/]+)")
_QIDO = re.compile(
    r"^/dicom-web(/studies(/[^/]+/series(/[^/]+/instances)?|/[^/]+/instances)?|/series|/instances)?$"
)
_SECURITY = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # link secrets and UIDs never leave in a Referer
    (b"x-frame-options", b"SAMEORIGIN"),
]
_SESSIONLESS = ("/link/", "/viewer", "/health")
_NO_STORE = [(b"cache-control", b"no-store")]
_UNAUDITED = ("/health", "/viewer", "/api/audit")  # static files, probes, and reading the log itself


def audit_of(scope: Scope) -> dict[str, Any]:
    """What a handler knows about the request for its audit record (patient, source, ...)."""
    return scope.setdefault("state", {}).setdefault("audit", {})


def _action(path: str) -> str | None:
    if path.startswith("/dicom-web"):
        if _QIDO.match(path):
            return "query"
        return "metadata" if path.endswith("/metadata") else "retrieve"
    return None


class AccessMiddleware:
    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access
        self.origins = set(access.config.cors_origins)

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
        if path.startswith(("/api", "/link")):
            extra += _NO_STORE
        state = scope.setdefault("state", {})
        sent = {"status": 0, "bytes": 0}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message["headers"] = list(message.get("headers", [])) + extra
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        # A link's session matters for data only: an old cookie must not stand in the way of the
        # viewer's files, a health probe, or opening another link.
        session = None if path.startswith(_SESSIONLESS) else _session(headers.get("cookie"))
        try:
            principal = self.access.principal(headers.get("authorization"), session)
        except GatewayError as exc:
            principal = Principal(role="anonymous", actor="anonymous")
            state["principal"] = principal
            response = PlainTextResponse(exc.message + "\n", status_code=exc.status)
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="gateway"'
            log.info("%s %s -> %d: %s", scope["method"], path, exc.status, exc.message)
            await response(scope, receive, send_with_headers)
            self._record(scope, principal, request_id, started, sent, headers, exc.message)
            return
        state["principal"] = principal
        state["request_id"] = request_id
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self._record(scope, principal, request_id, started, sent, headers, None)

    def _record(
        self,
        scope: Scope,
        principal: Principal,
        request_id: str,
        started: float,
        sent: dict[str, int],
        headers: dict[str, str],
        refusal: str | None,
    ) -> None:
        path: str = scope["path"]
        if path.startswith(_UNAUDITED) or scope["method"] == "OPTIONS":
            return
        noted = audit_of(scope)
        action = noted.get("action") or _action(path)
        if action is None:
            return  # not an access to imaging (a 404 outside the known resources)
        status = sent["status"] or 499  # the client hung up before any response started
        outcome = "success" if status < 400 else "denied" if status in (401, 403, 404) else "error"
        study = noted.get("study") or (m.group(1) if (m := _STUDY.match(path)) else None)
        client = scope.get("client")
        record = AuditRecord(
            time=started,
            request_id=request_id,
            actor=principal.actor,
            role="emergency" if noted.get("emergency") else principal.role,
            action=action,
            outcome=outcome,
            status=status,
            patient=noted.get("patient", principal.ins),
            study=study,
            organization=principal.organization,
            emergency=bool(noted.get("emergency")),
            reason=noted.get("reason") or refusal or noted.get("refusal"),
            source=noted.get("source"),
            bytes_sent=sent["bytes"],
            client=client[0] if client else None,
            path=path if not path.startswith("/link/") else "/link/…",  # never the link's secret
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
