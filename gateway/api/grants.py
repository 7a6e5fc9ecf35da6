"""The patient's consent: grants naming a professional or an organization who may see their
studies.

    POST   /api/grants             patient: {"grantee": "<RPPS>" | "org:<FINESS>", "expires_in"?}
    GET    /api/grants             patient: their grants
    DELETE /api/grants/{id}        patient: revoke
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import urls
from gateway.access.identity import grantee_key
from gateway.api.common import access_of, iso, json_answer, patient, read_json, required_string, run, seconds
from gateway.errors import NotFound, RequestError
from gateway.redact import escape

__all__ = ["ROUTES", "create_grant", "list_grants", "revoke_grant"]


async def create_grant(request: Request) -> Response:
    access = access_of(request)
    principal = patient(request)
    body = await read_json(request)
    grantee = required_string(body, "grantee")
    kind, _, identifier = (
        grantee.rpartition(":") if grantee.startswith(("org:", "pro:")) else ("pro", "", grantee)
    )
    professional_issuers = [i.issuer for i in access.config.issuers if i.role == "professional"]
    # An organization may also be named within a system issuer that names its own (its clients
    # are reached by that grant); people are named only by professional issuers.
    own_namespaces = [
        i.issuer for i in access.config.issuers if i.role == "system" and i.organizations_of is None
    ]
    issuer = _grantee_issuer(body, professional_issuers, own_namespaces if kind == "org" else [])
    if not identifier or "|" in identifier:
        raise RequestError("grantee: an RPPS, pro:<RPPS> or org:<FINESS>")
    key = grantee_key(kind, issuer, identifier)
    expires_in = seconds(body, "expires_in", 10 * 365 * 86400)
    expires = time.time() + expires_in if expires_in else None
    grant = await run(access.store.add_grant, principal.ins, key, expires)
    access.policy.forget()
    return json_answer(_grant_json(grant), 201)


async def list_grants(request: Request) -> Response:
    access = access_of(request)
    principal = patient(request)
    return json_answer([_grant_json(g) for g in await run(access.store.grants, principal.ins)])


async def revoke_grant(request: Request) -> Response:
    access = access_of(request)
    principal = patient(request)
    if not await run(access.store.revoke_grant, principal.ins, request.path_params["id"]):
        raise NotFound(f"no active grant {escape(request.path_params['id'], 64)} of yours")
    access.policy.forget()
    return Response(status_code=204)


def _grantee_issuer(body: dict[str, Any], issuers: list[str], also: list[str]) -> str:
    """The issuer a grant names its grantee within: the body's ``issuer`` (one of ``issuers`` or
    ``also``), or the one professional issuer configured. An RPPS means someone only at the
    issuer that vouches for it."""
    named = body.get("issuer")
    if named is not None:
        if named not in issuers + also:
            raise RequestError(
                f"issuer: not one of the professional issuers ({', '.join(issuers + also) or 'none'})"
            )
        return str(named)
    if len(issuers) != 1:
        raise RequestError(
            f"issuer: required, one of the professional issuers ({', '.join(issuers) or 'none'})"
        )
    return issuers[0]


def _grant_json(grant: dict[str, Any]) -> dict[str, Any]:
    kind, _, named = grant["grantee"].partition(":")
    issuer, _, identifier = named.rpartition("|")
    return {
        "id": grant["id"],
        "grantee": identifier if kind == "pro" else f"org:{identifier}",
        "issuer": issuer or None,
        "created_at": iso(grant["created"]),
        "expires_at": iso(grant["expires"]),
        "revoked_at": iso(grant["revoked"]),
    }


ROUTES = [
    Route(urls.GRANTS, create_grant, methods=["POST"]),
    Route(urls.GRANTS, list_grants, methods=["GET"]),
    Route(urls.GRANT, revoke_grant, methods=["DELETE"]),
]
