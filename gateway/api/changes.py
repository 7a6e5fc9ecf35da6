"""The change feed, read a page at a time: what harvest added and removed, and which studies
became available, were updated or were removed, as the caller's policy lets them see it.

    GET    /api/changes?since=SEQ&limit=N
                                   anyone authenticated: the events after SEQ (default 0) in
                                   sequence order, at most N (default 100, at most 1000), filtered
                                   like a search: a professional sees the events of patients who
                                   granted them (or under emergency access), a patient their own,
                                   a study link its study; hidden studies never.
                                   {"changes": [...], "next": SEQ} and Link: <...>; rel="next";
                                   410 when SEQ is below the retention horizon (see below)

A reader passes ``next`` (the last sequence number it was given, or its ``since`` when the page
is empty) as the next ``since``: sequence numbers only grow in commit order, with gaps (events
the caller may not see, transactions rolled back), so nothing is missed by asking from there
(``gateway.registry.changes``).

Events are kept ``[changes] keep_days`` (and until every subscription has them): the greatest
sequence number pruned is the feed's horizon. A ``since`` below it answers **410 Gone**, with
``{"error": ..., "horizon": H}``: events after ``since`` are gone, so a page would look complete
and not be. The reader then re-reads the current state of what it follows (a QIDO or FHIR search:
the index is not pruned) and goes on with ``since=H``. ``since=0`` on a feed never pruned is a
plain first page.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import urls
from gateway.api.common import access_of, iso, json_answer, run
from gateway.api.middleware import audit_of
from gateway.errors import RequestError
from gateway.types import Change

__all__ = ["ROUTES", "read_changes", "MAX_LIMIT"]

MAX_LIMIT = 1000  # events per page, at most
_DEFAULT_LIMIT = 100
_MAX_SEQ = 2**63 - 1  # the largest sequence number either database holds


async def read_changes(request: Request) -> Response:
    access = access_of(request)
    principal = request.scope["state"]["principal"]
    params = request.query_params
    for key in params:
        if key not in ("since", "limit"):
            raise RequestError(f"{key[:32]!r}: unknown parameter (since, limit)")
    since = _integer(params.get("since"), "since", 0, _MAX_SEQ, 0)
    limit = _integer(params.get("limit"), "limit", 1, MAX_LIMIT, _DEFAULT_LIMIT)
    # Raises for an anonymous caller (401); None: an open gateway, everything.
    restriction = await run(access.policy.restriction, principal)
    registry = access.policy.registry
    # The page first, the horizon after it: pruning moves the horizon in the transaction that
    # deletes, so a horizon at or below ``since`` read now was so when the page was read.
    found, horizon = await run(
        lambda: (registry.changes(since, limit, restriction), registry.changes_horizon())
    )
    noted = audit_of(request.scope)
    if since < horizon:
        message = (
            f"events up to {horizon} have been pruned (older than the retention period): events "
            f"after {since} are missing; re-read the current state (QIDO-RS or FHIR search), then "
            f"continue from since={horizon}"
        )
        noted["refusal"] = message
        return json_answer({"error": message, "horizon": horizon}, status=410)
    patients = {change.patient for change in found if change.patient}
    # The record names every patient whose events the answer carried, and whether any was seen
    # by emergency rules only.
    noted["patients"] = sorted(patients)
    noted["emergency"] = access.policy.emergency_among(principal, patients)
    following = found[-1].seq if found else since
    link = f"{access.server.base_url}{urls.CHANGES}?{urlencode({'since': following, 'limit': limit})}"
    response = json_answer({"changes": [_json(change) for change in found], "next": following})
    response.headers["Link"] = f'<{link}>; rel="next"'
    return response


def _integer(value: str | None, name: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if not value.isascii() or not value.isdigit() or len(value) > 19 or not low <= int(value) <= high:
        raise RequestError(f"{name}: an integer from {low} to {high} is required")
    return int(value)


def _json(change: Change) -> dict[str, Any]:
    out: dict[str, Any] = {
        "seq": change.seq,
        "time": iso(change.time),
        "kind": change.kind,
        "StudyInstanceUID": change.StudyInstanceUID,
        "instances": change.instances,
    }
    if change.source:
        out["source"] = change.source
    if change.SeriesInstanceUID:
        out["SeriesInstanceUID"] = change.SeriesInstanceUID
    if change.patient:
        out["patient"] = change.patient
    return out


ROUTES = [Route(urls.CHANGES, read_changes, methods=["GET"])]
