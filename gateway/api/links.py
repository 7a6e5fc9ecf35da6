"""Study links: a secret URL that opens one study in the viewer, for someone without an
account; the link's maker, or the patient, revokes it.

    POST   /api/links              {"StudyInstanceUID", "expires_in"} -> {"id", "url", "expires_at"}
    GET    /api/links[?all=true]   the caller's active links, newest first (all: revoked and expired too)
    DELETE /api/links/{id}         revoke (its sessions end at once)
    GET    /link/{secret}          exchange the secret for a study-scoped session cookie -> viewer
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway import urls
from gateway.access.control import SESSION_COOKIE
from gateway.api.common import access_of, caller, iso, json_answer, read_json, required_string, run, seconds
from gateway.api.middleware import audit_of
from gateway.errors import Forbidden, NotFound
from gateway.redact import escape

__all__ = ["ROUTES", "create_link", "list_links", "revoke_link", "use_link"]


async def create_link(request: Request) -> Response:
    access = access_of(request)
    principal = caller(request)
    if principal.role == "system":  # a link is a person's act of sharing, audited under their name
        raise Forbidden("study links are made by a patient or a professional, not by a system client")
    noted = audit_of(request.scope)
    body = await read_json(request)
    study = required_string(body, "StudyInstanceUID")
    noted["study"] = study
    expires_in = seconds(body, "expires_in", access.config.max_link_days * 86400, default=86400)
    assert expires_in is not None
    # Only a study that exists and the caller may see (the policy's uniform refusal otherwise).
    allowed = await run(access.policy.check_study, principal, study)
    noted["patient"] = allowed.patient
    if principal.role == "professional" and allowed.emergency:
        raise Forbidden("links cannot be made under emergency access")
    # A professional's link lives on the patient's grant: kept with the link, checked at each use.
    basis = principal.grantee_keys if principal.role == "professional" else ()
    link, secret = await run(
        access.store.add_link,
        study,
        allowed.patient,
        principal.key,
        principal.role,
        time.time() + expires_in,
        basis,
    )
    # From the configuration, never from the request's Host header (which the client writes).
    url = access.server.base_url + urls.LINK_USE.format(secret=secret)
    return json_answer({"id": link["id"], "url": url, "expires_at": iso(link["expires"])}, 201)


async def list_links(request: Request) -> Response:
    access = access_of(request)
    principal = caller(request)
    everything = request.query_params.get("all", "").lower() in ("1", "true", "yes")
    # A patient sees every link to their studies, whoever made it (and can revoke it).
    mine = principal.ins if principal.role == "patient" else None
    links = await run(access.store.links, principal.key, everything, 1000, mine)
    return json_answer([_link_json(link) for link in links])


async def revoke_link(request: Request) -> Response:
    access = access_of(request)
    principal = caller(request)
    noted = audit_of(request.scope)
    mine = principal.ins if principal.role == "patient" else None
    link = await run(access.store.revoke_link, principal.key, request.path_params["id"], mine)
    if link is None:
        raise NotFound(f"no active link {escape(request.path_params['id'], 64)} of yours")
    noted["study"], noted["patient"] = link["StudyInstanceUID"], link["patient"]
    access.policy.forget()
    return Response(status_code=204)


async def use_link(request: Request) -> Response:
    access = access_of(request)
    store = access.store
    noted = audit_of(request.scope)
    link = await run(store.link_by_secret, request.path_params["secret"])
    now = time.time()
    gone = NotFound("this study link does not exist, has expired or was revoked")
    if link is None or link["revoked"] is not None or link["expires"] <= now:
        raise gone
    noted["study"], noted["patient"] = link["StudyInstanceUID"], link["patient"]
    if await run(store.is_hidden, link["StudyInstanceUID"]):
        raise gone
    if not await run(store.link_consented, link["id"], now):
        raise gone  # the grant it was made under was revoked or has expired
    expires = min(link["expires"], now + access.config.session_minutes * 60)
    session = await run(store.add_session, link["id"], expires)
    target = f"{urls.VIEWER_STUDIES}?{urlencode({'StudyInstanceUIDs': link['StudyInstanceUID']})}"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session,
        max_age=int(expires - now),
        path="/",
        httponly=True,
        samesite="strict",
        # Behind a TLS proxy the scheme comes from a trusted X-Forwarded-Proto, or the
        # configured public URL says https.
        secure=request.url.scheme == "https" or access.server.base_url.startswith("https:"),
    )
    return response


def _link_json(link: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": link["id"],
        "StudyInstanceUID": link["StudyInstanceUID"],
        "created_at": iso(link["created"]),
        "expires_at": iso(link["expires"]),
        "revoked_at": iso(link["revoked"]),
    }


ROUTES = [
    Route(urls.LINKS, create_link, methods=["POST"]),
    Route(urls.LINKS, list_links, methods=["GET"]),
    Route(urls.LINK, revoke_link, methods=["DELETE"]),
    Route(urls.LINK_USE, use_link, methods=["GET"]),
]
