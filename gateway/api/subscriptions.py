"""Subscriptions: a professional, or a system client (an EHR or a RIS with its own token from a
``system`` issuer, acting for its organization), asks to be told when a study of a patient who
granted them (or their organization) arrives, changes or goes.

    POST   /api/subscriptions        {"channel": {"type": "rest-hook", "endpoint": "https://…",
                                      "header"?: "Authorization: Bearer …"}
                                      or {"type": "mllp", "endpoint": "mllp://host:port"},
                                      "scope"?: {"patient": "<INS>"} (default: every patient who
                                      granted the caller), "payload"?: "id-only" | "full"}
    GET    /api/subscriptions        the caller's own, newest first (?all=true: revoked ones too)
    DELETE /api/subscriptions/{id}   revoke one of the caller's own

Endpoints are addresses a client chose: one outside ``notify.allowed_origins`` is refused here
(400 naming the origin), and at delivery too. A subscription is derived from grants: consent is
checked for each event, when it is queued and when it is delivered (``gateway.notify.dispatch``).
The header (a credential for the receiver) is stored to be sent, and never shown again: the
listing gives its name only.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import urls
from gateway.api.common import access_of, caller, iso, json_answer, read_json, run
from gateway.api.middleware import audit_of
from gateway.config import notify_origin
from gateway.errors import Forbidden, NotFound, RequestError
from gateway.notify.dispatch import Dispatcher
from gateway.notify.store import CHANNELS, PAYLOADS, Subscription
from gateway.redact import escape

__all__ = ["ROUTES", "create_subscription", "list_subscriptions", "revoke_subscription"]

MAX_PER_OWNER = 100  # active subscriptions of one caller
_MAX_ENDPOINT = 2048
_HEADER = re.compile(r"([A-Za-z0-9-]{1,64}):[ \t]*([\x21-\x7e][\x20-\x7e]{0,1023})")
_RESERVED = {"host", "content-type", "content-length", "transfer-encoding", "connection", "accept"}
_INS = re.compile(r"[0-9A-Za-z]{1,32}")


def _dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.notify
    return dispatcher


def _subscriber(request: Request) -> Any:
    principal = caller(request)
    if not principal.consents:
        raise Forbidden(
            "only a professional or a system client can subscribe (a token of a professional or "
            "system issuer): a subscription is derived from patients' grants"
        )
    return principal


async def create_subscription(request: Request) -> Response:
    access = access_of(request)
    dispatcher = _dispatcher(request)
    principal = _subscriber(request)
    body = await read_json(request)
    channel, endpoint, header = _channel(body.get("channel"), dispatcher.config.allowed_origins)
    payload = body.get("payload", "id-only")
    if payload not in PAYLOADS:
        raise RequestError(f"payload: one of {', '.join(PAYLOADS)}")
    patient = _scope(body.get("scope"))
    if patient is not None:
        audit_of(request.scope)["patients"] = [patient]
        await run(access.policy.check_patient, principal, patient)  # the refusal a professional gets
    mine = await run(dispatcher.store.owned, principal.issuer, principal.actor)
    if len(mine) >= MAX_PER_OWNER:
        raise RequestError(f"at most {MAX_PER_OWNER} active subscriptions per caller: revoke one first")
    cursor = await run(dispatcher.head)
    subscription = await run(
        lambda: dispatcher.store.add(
            issuer=principal.issuer,
            subject=principal.actor,
            role=principal.role,
            organization=principal.organization,
            patient=patient,
            channel=channel,
            endpoint=endpoint,
            header=header,
            payload=payload,
            cursor=cursor,
        )
    )
    return json_answer(_json(subscription), 201)


async def list_subscriptions(request: Request) -> Response:
    principal = _subscriber(request)
    everything = request.query_params.get("all") == "true"
    found = await run(_dispatcher(request).store.owned, principal.issuer, principal.actor, everything)
    return json_answer([_json(s) for s in found])


async def revoke_subscription(request: Request) -> Response:
    principal = _subscriber(request)
    wanted = request.path_params["id"]
    if not await run(_dispatcher(request).store.revoke, principal.issuer, principal.actor, wanted):
        raise NotFound(f"no active subscription {escape(wanted, 64)} of yours")
    return Response(status_code=204)


def _channel(value: Any, allowed: tuple[str, ...]) -> tuple[str, str, str | None]:
    if not isinstance(value, dict):
        raise RequestError('channel: an object, {"type": "rest-hook" | "mllp", "endpoint": "..."}')
    kind, endpoint, header = value.get("type"), value.get("endpoint"), value.get("header")
    if kind not in CHANNELS:
        raise RequestError(f"channel.type: one of {', '.join(CHANNELS)}")
    if not isinstance(endpoint, str) or not 0 < len(endpoint) <= _MAX_ENDPOINT:
        raise RequestError(f"channel.endpoint: a URL of at most {_MAX_ENDPOINT} characters")
    origin = notify_origin(endpoint)
    schemes = ("http", "https") if kind == "rest-hook" else ("mllp",)
    if origin is None or origin.split(":")[0] not in schemes or any(c in endpoint for c in "\r\n\t "):
        shape = "https://host[:port]/path" if kind == "rest-hook" else "mllp://host:port"
        raise RequestError(f"channel.endpoint: not a {kind} address ({shape}, no credentials)")
    parts = urlsplit(endpoint)
    if parts.fragment or (kind == "mllp" and (parts.path.strip("/") or parts.query)):
        raise RequestError("channel.endpoint: an MLLP address has no path, and no address a fragment")
    if origin not in allowed:
        raise RequestError(
            f"channel.endpoint: the origin {escape(origin, 300)} is not among notify.allowed_origins"
        )
    if header is not None:
        found = _HEADER.fullmatch(header) if isinstance(header, str) and kind == "rest-hook" else None
        if found is None or found.group(1).lower() in _RESERVED:
            raise RequestError(
                'channel.header: one "Name: value" header of printable characters (rest-hook only)'
            )
    return kind, endpoint, header


def _scope(value: Any) -> str | None:
    if value is None or value == "all" or value == {}:
        return None
    patient = value.get("patient") if isinstance(value, dict) else None
    if not isinstance(patient, str) or not _INS.fullmatch(patient) or len(value) != 1:
        raise RequestError(
            'scope: {"patient": "<INS>"} for one patient, or "all" (every patient who granted you)'
        )
    return patient


def _json(subscription: Subscription) -> dict[str, Any]:
    channel: dict[str, Any] = {"type": subscription.channel, "endpoint": subscription.endpoint}
    if subscription.header:
        channel["header"] = subscription.header.partition(":")[0] + ": …"  # the value is a secret
    return {
        "id": subscription.id,
        "channel": channel,
        "scope": {"patient": subscription.patient} if subscription.patient else "all",
        "payload": subscription.payload,
        "status": "off" if subscription.revoked else "active",
        "created_at": iso(subscription.created),
        "revoked_at": iso(subscription.revoked),
    }


ROUTES = [
    Route(urls.SUBSCRIPTIONS, create_subscription, methods=["POST"]),
    Route(urls.SUBSCRIPTIONS, list_subscriptions, methods=["GET"]),
    Route(urls.SUBSCRIPTION, revoke_subscription, methods=["DELETE"]),
]
