"""Studies a patient hides from everyone but themselves, whatever grants, links and emergency
access say.

    POST   /api/hidden             patient: {"StudyInstanceUID"} hide from everyone
    GET    /api/hidden             patient: their hidden studies
    DELETE /api/hidden/{uid}       patient: show again
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import urls
from gateway.api.common import access_of, json_answer, patient, read_json, required_string, run
from gateway.api.middleware import audit_of
from gateway.errors import NotFound
from gateway.redact import escape

__all__ = ["ROUTES", "hide", "list_hidden", "unhide"]


async def hide(request: Request) -> Response:
    access = access_of(request)
    principal = patient(request)
    noted = audit_of(request.scope)
    study = required_string(await read_json(request), "StudyInstanceUID")
    noted["study"] = study
    await run(access.policy.check_study, principal, study)  # their own study only (404 otherwise)
    await run(access.store.hide, study, principal.ins)
    access.policy.forget()
    return json_answer({"StudyInstanceUID": study, "hidden": True}, 201)


async def list_hidden(request: Request) -> Response:
    access = access_of(request)
    principal = patient(request)
    return json_answer(sorted(await run(access.store.hidden, principal.ins)))


async def unhide(request: Request) -> Response:
    access = access_of(request)
    principal = patient(request)
    noted = audit_of(request.scope)
    study = request.path_params["uid"]
    noted["study"] = study
    if not await run(access.store.unhide, study, principal.ins):
        raise NotFound(f"study {escape(study, 64)} is not hidden")
    access.policy.forget()
    return Response(status_code=204)


ROUTES = [
    Route(urls.HIDDEN, hide, methods=["POST"]),
    Route(urls.HIDDEN, list_hidden, methods=["GET"]),
    Route(urls.HIDDEN_STUDY, unhide, methods=["DELETE"]),
]
