"""The patient's access history: who accessed what, newest first, a page at a time, as JSON,
FHIR AuditEvents or DICOM audit messages (PS3.15 A.5).

    GET    /api/audit              patient: who accessed what, newest first, paged (limit, before,
                                   since, until; a Link to the next page); ?format=fhir|dicom
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import urls
from gateway.access.export import audit_bundle, dicom_audit_message
from gateway.api.common import access_of, caller, iso, json_answer, run
from gateway.errors import Forbidden, RequestError
from gateway.redact import escape

__all__ = ["ROUTES", "audit"]

_AUDIT_PAGE = 1000  # records per page of the access history, at most


async def audit(request: Request) -> Response:
    access = access_of(request)
    principal = caller(request)
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
    records = await run(access.store.audit, patient, limit + 1, before, since, until)
    # A page, newest first; the next one is linked (RFC 8288) whenever more records exist:
    # no history is ever cut silently.
    headers, following = {}, None
    if len(records) > limit:
        records = records[:limit]
        query = {k: v for k, v in params.items() if k != "before"} | {"before": str(records[-1].id)}
        following = f"{access.server.base_url}{urls.AUDIT}?{urlencode(query)}"
        headers["Link"] = f'<{following}>; rel="next"'
    if kind == "fhir":
        bundle = audit_bundle(records, "gateway", following)
        return Response(orjson.dumps(bundle), media_type="application/fhir+json", headers=headers)
    if kind == "dicom":
        # One document holding the messages: each one's own XML declaration is dropped.
        messages = (dicom_audit_message(r, "gateway").split(b"?>", 1)[-1].strip() for r in records)
        body = b"<?xml version='1.0' encoding='utf-8'?>\n<AuditMessages>\n" + b"\n".join(messages)
        return Response(body + b"\n</AuditMessages>", media_type="application/xml", headers=headers)
    response = json_answer([_audit_json(r) for r in records])
    response.headers.update(headers)
    return response


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


def _audit_json(record: Any) -> dict[str, Any]:
    out = {k: v for k, v in vars(record).items() if v is not None and v != ()}
    out["time"] = iso(record.time)
    if record.ended is not None:
        out["ended"] = iso(record.ended)
    return out


ROUTES = [Route(urls.AUDIT, audit, methods=["GET"])]
