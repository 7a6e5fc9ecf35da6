"""The JSON API for the portal and for professionals' software, the study-link exchange, and IHE
Invoke Image Display.

    POST   /api/links              {"StudyInstanceUID", "expires_in"} -> {"id", "url", "expires_at"}
    GET    /api/links[?all=true]   the caller's active links, newest first (all: revoked and expired too)
    DELETE /api/links/{id}         revoke (its sessions end at once)
    GET    /link/{secret}          exchange the secret for a study-scoped session cookie -> viewer
    POST   /api/grants             patient: {"grantee": "<RPPS>" | "org:<FINESS>", "expires_in"?}
    GET    /api/grants             patient: their grants
    DELETE /api/grants/{id}        patient: revoke
    POST   /api/hidden             patient: {"StudyInstanceUID"} hide from everyone
    GET    /api/hidden             patient: their hidden studies
    DELETE /api/hidden/{uid}       patient: show again
    POST   /api/emergency          emergency role: {"patient": "<INS>", "reason"} -> time-limited access
    GET    /api/emergency          patient: emergency accesses to their studies
    GET    /api/audit              patient: who accessed what, newest first, paged (limit, before,
                                   since, until; a Link to the next page); ?format=fhir|dicom
    GET    /IHEInvokeImageDisplay  ?requestType=STUDY&studyUID=... | PATIENT&patientID=...
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import anyio.to_thread
import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.access.export import audit_bundle, dicom_audit_message
from gateway.access.identity import Principal, grantee_key
from gateway.access.service import SESSION_COOKIE, Access
from gateway.api.middleware import audit_of
from gateway.errors import Forbidden, NotFound, RequestError, Unauthenticated
from gateway.redact import escape

__all__ = ["api_routes"]

_VIEWER = "/viewer/viewer"  # OHIF's route for one or more studies
_MAX_BODY = 64 * 1024
_AUDIT_PAGE = 1000  # records per page of the access history, at most
_IID_STUDIES = 100  # studies one Invoke Image Display may open


def _json(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


def _principal(request: Request) -> Principal:
    principal: Principal = request.scope["state"]["principal"]
    if principal.role == "anonymous":
        raise Unauthenticated("credentials are needed (Authorization: Bearer <token>)")
    if principal.role == "link":
        raise Forbidden("a study link is read-only: it cannot manage links, grants or hidden studies")
    return principal


def _patient(request: Request) -> Principal:
    principal = _principal(request)
    if principal.role != "patient":
        raise Forbidden("only the patient can do this (a patient token with an INS)")
    return principal


async def _body(request: Request) -> dict[str, Any]:
    # Read as it arrives and stopped past the bound: request.body() would hold any size whole.
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > _MAX_BODY:
            raise RequestError(f"request body larger than {_MAX_BODY} bytes")
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request body is not JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{key}: a non-empty string is required")
    return value.strip()


def _seconds(body: dict[str, Any], key: str, maximum: float, default: float | None = None) -> float | None:
    value = body.get(key)
    if value is None:  # absent, or null: the default
        value = default
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise RequestError(f"{key}: a positive number of seconds is required")
    if value > maximum:
        raise RequestError(f"{key}: at most {maximum:g} seconds")
    return float(value)


def _number(value: str | None, name: str, low: int, high: int, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    if not value.isdigit() or len(value) > 19 or not low <= int(value) <= high:
        raise RequestError(f"{name}: an integer from {low} to {high} is required")
    return int(value)


def _moment(value: str | None, name: str) -> float | None:
    """An ISO 8601 date or date-time (UTC unless it says otherwise) as seconds since the epoch."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value[:64])
    except ValueError:
        raise RequestError(f"{name}: an ISO 8601 date-time is required (2026-12-01T08:00:00Z)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _grantee_issuer(body: dict[str, Any], issuers: list[str]) -> str:
    """The issuer a grant names its grantee within: the body's ``issuer``, or the one
    professional issuer configured. An RPPS means someone only at the issuer that vouches for it."""
    named = body.get("issuer")
    if named is not None:
        if named not in issuers:
            raise RequestError(
                f"issuer: not one of the professional issuers ({', '.join(issuers) or 'none'})"
            )
        return str(named)
    if len(issuers) != 1:
        raise RequestError(
            f"issuer: required, one of the professional issuers ({', '.join(issuers) or 'none'})"
        )
    return issuers[0]


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def api_routes(access: Access) -> list[Route]:
    store, policy = access.store, access.policy
    professional_issuers = [i.issuer for i in access.config.issuers if i.role == "professional"]

    async def run(function: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(function, *args)

    # -- links -----------------------------------------------------------------------------------

    async def create_link(request: Request) -> Response:
        principal = _principal(request)
        noted = audit_of(request.scope)
        body = await _body(request)
        study = _string(body, "StudyInstanceUID")
        noted["study"] = study
        expires_in = _seconds(body, "expires_in", access.config.max_link_days * 86400, default=86400)
        assert expires_in is not None
        # Only a study that exists and the caller may see (the policy's uniform refusal otherwise).
        allowed = await run(policy.check_study, principal, study)
        noted["patient"] = allowed.patient
        if principal.role == "professional" and allowed.emergency:
            raise Forbidden("links cannot be made under emergency access")
        # A professional's link lives on the patient's grant: kept with the link, checked at each use.
        basis = principal.grantee_keys if principal.role == "professional" else ()
        link, secret = await run(
            store.add_link,
            study,
            allowed.patient,
            principal.key,
            principal.role,
            time.time() + expires_in,
            basis,
        )
        # From the configuration, never from the request's Host header (which the client writes).
        url = f"{access.server.base_url}/link/{secret}"
        return _json({"id": link["id"], "url": url, "expires_at": _iso(link["expires"])}, 201)

    async def list_links(request: Request) -> Response:
        principal = _principal(request)
        everything = request.query_params.get("all", "").lower() in ("1", "true", "yes")
        # A patient sees every link to their studies, whoever made it (and can revoke it).
        mine = principal.ins if principal.role == "patient" else None
        links = await run(store.links, principal.key, everything, 1000, mine)
        return _json([_link_json(link) for link in links])

    async def revoke_link(request: Request) -> Response:
        principal = _principal(request)
        noted = audit_of(request.scope)
        mine = principal.ins if principal.role == "patient" else None
        link = await run(store.revoke_link, principal.key, request.path_params["id"], mine)
        if link is None:
            raise NotFound(f"no active link {escape(request.path_params['id'], 64)} of yours")
        noted["study"], noted["patient"] = link["StudyInstanceUID"], link["patient"]
        policy.forget()
        return Response(status_code=204)

    async def use_link(request: Request) -> Response:
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
        target = f"{_VIEWER}?{urlencode({'StudyInstanceUIDs': link['StudyInstanceUID']})}"
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

    # -- grants and hidden studies (the patient's decisions) ---------------------------------------

    async def create_grant(request: Request) -> Response:
        principal = _patient(request)
        body = await _body(request)
        grantee = _string(body, "grantee")
        issuer = _grantee_issuer(body, professional_issuers)
        kind, _, identifier = (
            grantee.rpartition(":") if grantee.startswith(("org:", "pro:")) else ("pro", "", grantee)
        )
        if not identifier or "|" in identifier:
            raise RequestError("grantee: an RPPS, pro:<RPPS> or org:<FINESS>")
        key = grantee_key(kind, issuer, identifier)
        expires_in = _seconds(body, "expires_in", 10 * 365 * 86400)
        expires = time.time() + expires_in if expires_in else None
        grant = await run(store.add_grant, principal.ins, key, expires)
        policy.forget()
        return _json(_grant_json(grant), 201)

    async def list_grants(request: Request) -> Response:
        principal = _patient(request)
        return _json([_grant_json(g) for g in await run(store.grants, principal.ins)])

    async def revoke_grant(request: Request) -> Response:
        principal = _patient(request)
        if not await run(store.revoke_grant, principal.ins, request.path_params["id"]):
            raise NotFound(f"no active grant {escape(request.path_params['id'], 64)} of yours")
        policy.forget()
        return Response(status_code=204)

    async def hide(request: Request) -> Response:
        principal = _patient(request)
        noted = audit_of(request.scope)
        study = _string(await _body(request), "StudyInstanceUID")
        noted["study"] = study
        await run(policy.check_study, principal, study)  # their own study only (404 otherwise)
        await run(store.hide, study, principal.ins)
        policy.forget()
        return _json({"StudyInstanceUID": study, "hidden": True}, 201)

    async def list_hidden(request: Request) -> Response:
        principal = _patient(request)
        return _json(sorted(await run(store.hidden, principal.ins)))

    async def unhide(request: Request) -> Response:
        principal = _patient(request)
        noted = audit_of(request.scope)
        study = request.path_params["uid"]
        noted["study"] = study
        if not await run(store.unhide, study, principal.ins):
            raise NotFound(f"study {escape(study, 64)} is not hidden")
        policy.forget()
        return Response(status_code=204)

    # -- emergency access ---------------------------------------------------------------------------

    async def open_emergency(request: Request) -> Response:
        principal = _principal(request)
        noted = audit_of(request.scope)
        noted["emergency"] = True
        if principal.role != "professional" or not principal.emergency:
            raise Forbidden(
                "emergency access is for the roles configured as emergency (auth.issuers.emergency_roles)"
            )
        body = await _body(request)
        patient = _string(body, "patient")
        reason = _string(body, "reason")
        if len(reason) < 10:
            raise RequestError("reason: say why (at least 10 characters); it is shown to the patient")
        noted["patient"], noted["reason"] = patient, reason
        expires = time.time() + access.config.emergency_minutes * 60
        row = await run(store.open_emergency, patient, principal.key, principal.organization, reason, expires)
        policy.forget()
        return _json({"id": row["id"], "patient": patient, "expires_at": _iso(expires)}, 201)

    async def list_emergencies(request: Request) -> Response:
        principal = _patient(request)
        rows = await run(store.emergencies, principal.ins)
        return _json(
            [
                {
                    "actor": r["actor"].rpartition("|")[2],
                    "issuer": r["actor"].rpartition("|")[0] or None,
                    "organization": r["organization"],
                    "reason": r["reason"],
                    "opened_at": _iso(r["created"]),
                    "expires_at": _iso(r["expires"]),
                }
                for r in rows
            ]  # fmt: skip
        )

    # -- the patient's access history ---------------------------------------------------------------

    async def audit(request: Request) -> Response:
        principal = _principal(request)
        if principal.role not in ("patient", "open"):
            raise Forbidden("the access history is the patient's (a patient token)")
        params = request.query_params
        kind = params.get("format", "json")
        if kind not in ("json", "fhir", "dicom"):
            raise RequestError(f"format: {escape(kind, 32)!r} is not json, fhir or dicom")
        limit = _number(params.get("limit"), "limit", 1, _AUDIT_PAGE, default=100) or 100
        before = _number(params.get("before"), "before", 1, 2**62)
        since, until = _moment(params.get("since"), "since"), _moment(params.get("until"), "until")
        await run(access.audit.flush)  # include what is still queued
        patient = principal.ins if principal.role == "patient" else None
        records = await run(store.audit, patient, limit + 1, before, since, until)
        # A page, newest first; the next one is linked (RFC 8288) whenever more records exist:
        # no history is ever cut silently.
        headers, following = {}, None
        if len(records) > limit:
            records = records[:limit]
            query = {k: v for k, v in params.items() if k != "before"} | {"before": str(records[-1].id)}
            following = f"{access.server.base_url}/api/audit?{urlencode(query)}"
            headers["Link"] = f'<{following}>; rel="next"'
        if kind == "fhir":
            bundle = audit_bundle(records, "gateway", following)
            return Response(orjson.dumps(bundle), media_type="application/fhir+json", headers=headers)
        if kind == "dicom":
            # One document holding the messages: each one's own XML declaration is dropped.
            messages = (dicom_audit_message(r, "gateway").split(b"?>", 1)[-1].strip() for r in records)
            body = b"<?xml version='1.0' encoding='utf-8'?>\n<AuditMessages>\n" + b"\n".join(messages)
            return Response(body + b"\n</AuditMessages>", media_type="application/xml", headers=headers)
        response = _json([_audit_json(r) for r in records])
        response.headers.update(headers)
        return response

    # -- IHE Invoke Image Display (IHE RAD TF-2 4.106) ----------------------------------------------

    async def invoke_image_display(request: Request) -> Response:
        noted = audit_of(request.scope)
        params = request.query_params
        kind = params.get("requestType", "").upper()
        principal = request.scope["state"]["principal"]
        if kind == "STUDY":
            studies = [uid for uid in params.get("studyUID", "").split(",") if uid]
            if not studies:
                raise RequestError("studyUID: required for requestType=STUDY")
            if len(studies) > _IID_STUDIES:
                raise RequestError(f"studyUID: at most {_IID_STUDIES} studies")
            patients: list[str] = []
            emergency = False
            for study in studies:
                allowed = await run(policy.check_study, principal, study)
                patients.append(allowed.patient or "")
                emergency |= allowed.emergency
            # Every patient whose study the viewer is opened on, in the one record.
            noted["patients"], noted["emergency"] = [p for p in patients if p], emergency
            if len(studies) == 1:
                noted["study"] = studies[0]
            return RedirectResponse(f"{_VIEWER}?{urlencode({'StudyInstanceUIDs': ','.join(studies)})}", 303)
        if kind == "PATIENT":
            patient = params.get("patientID")
            if not patient:
                raise RequestError("patientID: required for requestType=PATIENT")
            allowed = await run(policy.check_patient, principal, patient)
            noted["patient"], noted["emergency"] = patient, allowed.emergency
            # The study list, filtered by the viewer's own QIDO (which the policy filters again).
            return RedirectResponse(f"/viewer/?mrn={quote(patient)}", 303)
        raise RequestError(f"requestType: {escape(kind, 32) or 'missing'} is not STUDY or PATIENT")

    return [
        Route("/api/links", create_link, methods=["POST"]),
        Route("/api/links", list_links, methods=["GET"]),
        Route("/api/links/{id}", revoke_link, methods=["DELETE"]),
        Route("/link/{secret}", use_link, methods=["GET"]),
        Route("/api/grants", create_grant, methods=["POST"]),
        Route("/api/grants", list_grants, methods=["GET"]),
        Route("/api/grants/{id}", revoke_grant, methods=["DELETE"]),
        Route("/api/hidden", hide, methods=["POST"]),
        Route("/api/hidden", list_hidden, methods=["GET"]),
        Route("/api/hidden/{uid}", unhide, methods=["DELETE"]),
        Route("/api/emergency", open_emergency, methods=["POST"]),
        Route("/api/emergency", list_emergencies, methods=["GET"]),
        Route("/api/audit", audit, methods=["GET"]),
        Route("/IHEInvokeImageDisplay", invoke_image_display, methods=["GET"]),
    ]


def _link_json(link: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": link["id"],
        "StudyInstanceUID": link["StudyInstanceUID"],
        "created_at": _iso(link["created"]),
        "expires_at": _iso(link["expires"]),
        "revoked_at": _iso(link["revoked"]),
    }


def _grant_json(grant: dict[str, Any]) -> dict[str, Any]:
    kind, _, named = grant["grantee"].partition(":")
    issuer, _, identifier = named.rpartition("|")
    return {
        "id": grant["id"],
        "grantee": identifier if kind == "pro" else f"org:{identifier}",
        "issuer": issuer or None,
        "created_at": _iso(grant["created"]),
        "expires_at": _iso(grant["expires"]),
        "revoked_at": _iso(grant["revoked"]),
    }


def _audit_json(record: Any) -> dict[str, Any]:
    out = {k: v for k, v in vars(record).items() if v is not None and v != ()}
    out["time"] = _iso(record.time)
    if record.ended is not None:
        out["ended"] = _iso(record.ended)
    return out
