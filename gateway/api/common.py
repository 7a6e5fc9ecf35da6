"""What every JSON API handler needs: the access service, who is calling, a bounded JSON body,
checked fields, JSON answers, and a worker thread for the store's blocking calls."""

from __future__ import annotations

import time
from typing import Any

import anyio.to_thread
import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.access.control import Access
from gateway.access.identity import Principal
from gateway.errors import Forbidden, RequestError, Unauthenticated

__all__ = [
    "MAX_BODY",
    "access_of",
    "caller",
    "patient",
    "read_json",
    "required_string",
    "seconds",
    "iso",
    "json_answer",
    "run",
]

MAX_BODY = 64 * 1024


def access_of(request: Request) -> Access:
    """The application's access service (``app.state.access``, set by ``create_app``)."""
    access: Access = request.app.state.access
    return access


def caller(request: Request) -> Principal:
    """The authenticated caller; a study link's session is refused (it only reads its study)."""
    principal: Principal = request.scope["state"]["principal"]
    if principal.role == "anonymous":
        raise Unauthenticated("credentials are needed (Authorization: Bearer <token>)")
    if principal.role == "link":
        raise Forbidden("a study link is read-only: it cannot manage links, grants or hidden studies")
    return principal


def patient(request: Request) -> Principal:
    """The caller, who must be a patient: grants, hidden studies and the history are theirs."""
    principal = caller(request)
    if principal.role != "patient":
        raise Forbidden("only the patient can do this (a patient token with an INS)")
    return principal


async def read_json(request: Request) -> dict[str, Any]:
    """The request's body, a JSON object of at most :data:`MAX_BODY` bytes (none: ``{}``)."""
    # Read as it arrives and stopped past the bound: request.body() would hold any size whole.
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise RequestError(f"request body larger than {MAX_BODY} bytes")
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request body is not JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


def required_string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{key}: a non-empty string is required")
    return value.strip()


def seconds(body: dict[str, Any], key: str, maximum: float, default: float | None = None) -> float | None:
    """A duration in seconds, positive and at most ``maximum``; absent or null: ``default``."""
    value = body.get(key)
    if value is None:
        value = default
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise RequestError(f"{key}: a positive number of seconds is required")
    if value > maximum:
        raise RequestError(f"{key}: at most {maximum:g} seconds")
    return float(value)


def iso(epoch: float | None) -> str | None:
    """Seconds since the epoch as an ISO 8601 UTC date-time, as the API answers them."""
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def json_answer(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


async def run(function: Any, *args: Any) -> Any:
    """``function(*args)`` in a worker thread: the access store blocks on its database."""
    return await anyio.to_thread.run_sync(function, *args)
