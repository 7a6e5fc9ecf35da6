"""How a failure reaches the client: a ``text/plain`` answer saying what was wrong, its status
from the error itself (:mod:`gateway.errors`), the refusal noted for the audit record.

Starlette's own 404 and 405 are reworded so that no path is echoed unredacted (a link's secret)
nor unbounded; anything unexpected is logged whole and answered by its type's name only.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from gateway.api.middleware import audit_of, logged_path
from gateway.errors import GatewayError
from gateway.redact import escape

__all__ = ["EXCEPTION_HANDLERS", "gateway_error", "http_error", "unexpected"]

log = logging.getLogger("gateway.http")


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    audit_of(request.scope)["refusal"] = exc.message
    if exc.status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="gateway"'}
        return PlainTextResponse(exc.message + "\n", status_code=exc.status, headers=headers)
    path = logged_path(request.url.path)
    if exc.status >= 500:
        log.error("%s %s -> %d: %s", request.method, path, exc.status, exc.message)
    else:
        log.info("%s %s -> %d: %s", request.method, path, exc.status, exc.message)
    return PlainTextResponse(exc.message + "\n", status_code=exc.status)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no resource at {logged_path(request.url.path)}"
    elif exc.status_code == 405:
        detail = f"{escape(request.method, 16)} is not supported on {logged_path(request.url.path)}"
    return PlainTextResponse(f"{detail}\n", status_code=exc.status_code, headers=exc.headers)


async def unexpected(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, logged_path(request.url.path))
    return PlainTextResponse(f"internal error: {type(exc).__name__}\n", status_code=500)


EXCEPTION_HANDLERS = {GatewayError: gateway_error, HTTPException: http_error, Exception: unexpected}
