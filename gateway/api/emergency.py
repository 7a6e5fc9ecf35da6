"""Emergency access ("break the glass"): a professional of an emergency role opens a patient's
studies for a while, saying why; the patient sees who did and why.

    POST   /api/emergency          emergency role: {"patient": "<INS>", "reason"} -> time-limited access
    GET    /api/emergency          patient: emergency accesses to their studies
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import urls
from gateway.api.common import access_of, caller, iso, json_answer, patient, read_json, required_string, run
from gateway.api.middleware import audit_of
from gateway.errors import Forbidden, RequestError

__all__ = ["ROUTES", "open_emergency", "list_emergencies"]


async def open_emergency(request: Request) -> Response:
    access = access_of(request)
    principal = caller(request)
    noted = audit_of(request.scope)
    noted["emergency"] = True
    if principal.role != "professional" or not principal.emergency:
        raise Forbidden(
            "emergency access is for the roles configured as emergency (auth.issuers.emergency_roles)"
        )
    body = await read_json(request)
    ins = required_string(body, "patient")
    reason = required_string(body, "reason")
    if len(reason) < 10:
        raise RequestError("reason: say why (at least 10 characters); it is shown to the patient")
    noted["patient"], noted["reason"] = ins, reason
    expires = time.time() + access.config.emergency_minutes * 60
    row = await run(access.store.open_emergency, ins, principal.key, principal.organization, reason, expires)
    access.policy.forget()
    return json_answer({"id": row["id"], "patient": ins, "expires_at": iso(expires)}, 201)


async def list_emergencies(request: Request) -> Response:
    access = access_of(request)
    principal = patient(request)
    rows = await run(access.store.emergencies, principal.ins)
    return json_answer(
        [
            {
                "actor": r["actor"].rpartition("|")[2],
                "issuer": r["actor"].rpartition("|")[0] or None,
                "organization": r["organization"],
                "reason": r["reason"],
                "opened_at": iso(r["created"]),
                "expires_at": iso(r["expires"]),
            }
            for r in rows
        ]  # fmt: skip
    )


ROUTES = [
    Route(urls.EMERGENCY, open_emergency, methods=["POST"]),
    Route(urls.EMERGENCY, list_emergencies, methods=["GET"]),
]
