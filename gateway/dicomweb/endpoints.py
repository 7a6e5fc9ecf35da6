"""The DICOMweb endpoints (PS3.18): QIDO-RS searches (10.6) and WADO-RS retrieves (10.4) under
:data:`gateway.urls.DICOMWEB`, and the health probe.

Every endpoint asks the access policy first, QIDO for the caller's restriction, WADO for the
study, notes for the request's audit record what only it knows, and hands the request over to
:mod:`.search`, :mod:`.retrieve` or :mod:`.metadata`. What they serve from is one
:class:`DicomwebState` in the application's state (``app.state.dicomweb``), so the endpoints are
plain functions and :data:`ROUTES` one table.

Frame GETs, the hot path (one request per image of a study), skip Starlette's routing and
middleware stack: :class:`FramesFastPath` answers them before the application sees them, behind
the access middleware all the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import __version__, urls
from gateway.access.identity import Principal
from gateway.access.policy import Policy
from gateway.api.error_handlers import gateway_error, unexpected
from gateway.api.middleware import audit_of
from gateway.dicomweb.metadata import retrieve_metadata
from gateway.dicomweb.retrieve import retrieve_bulk, retrieve_frames, retrieve_instances
from gateway.dicomweb.search import search
from gateway.dicomweb.streaming import SizedStream
from gateway.errors import GatewayError
from gateway.registry.store import Registry
from gateway.stream.federation import Federation

__all__ = [
    "DicomwebState",
    "FramesFastPath",
    "ROUTES",
    "health",
    "qido_studies",
    "qido_series",
    "qido_instances",
    "wado_instances",
    "wado_metadata",
    "wado_frames",
    "wado_bulk",
]


@dataclass(frozen=True)
class DicomwebState:
    """What the DICOMweb endpoints serve from: the index, the sources, the access policy."""

    registry: Registry
    federation: Federation
    policy: Policy


def _state(request: Request) -> DicomwebState:
    state: DicomwebState = request.app.state.dicomweb
    return state


def _allow(request: Request, policy: Policy, study: str) -> None:
    """The policy's decision on one study, noted for the audit record; raises a refusal."""
    principal: Principal = request.scope["state"]["principal"]
    allowed = policy.check_study(principal, study)
    noted = audit_of(request.scope)
    noted["patient"], noted["emergency"] = allowed.patient, allowed.emergency


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/") + urls.DICOMWEB


def _scope_of(request: Request) -> dict[str, str]:
    """The UIDs the path names, by their DICOM keywords."""
    params = request.path_params
    out = {"StudyInstanceUID": params["study"]}
    if "series" in params:
        out["SeriesInstanceUID"] = params["series"]
    if "instance" in params:
        out["SOPInstanceUID"] = params["instance"]
    return out


# -- QIDO-RS --------------------------------------------------------------------------------------


async def _qido(request: Request, level: str) -> Response:
    state = _state(request)
    scope = _scope_of(request) if "study" in request.path_params else {}
    if scope:
        _allow(request, state.policy, scope["StudyInstanceUID"])
    principal = request.scope["state"]["principal"]
    restriction = state.policy.restriction(principal)
    patients: set[str] = set()
    response = await search(request, state.registry, level, scope, _base_url(request), restriction, patients)
    # The record names every patient whose studies the answer carried, and whether any was seen
    # by emergency rules only.
    noted = audit_of(request.scope)
    noted["patients"] = sorted(patients)
    noted["emergency"] = noted.get("emergency") or state.policy.emergency_among(principal, patients)
    return response


async def qido_studies(request: Request) -> Response:
    return await _qido(request, "study")


async def qido_series(request: Request) -> Response:
    return await _qido(request, "series")


async def qido_instances(request: Request) -> Response:
    return await _qido(request, "instance")


# -- WADO-RS --------------------------------------------------------------------------------------


async def wado_instances(request: Request) -> Response:
    state, scope = _state(request), _scope_of(request)
    _allow(request, state.policy, scope["StudyInstanceUID"])
    return await retrieve_instances(request, state.registry, state.federation, scope, _base_url(request))


async def wado_metadata(request: Request) -> Response:
    state, scope = _state(request), _scope_of(request)
    _allow(request, state.policy, scope["StudyInstanceUID"])
    return await retrieve_metadata(request, state.registry, state.federation, scope, _base_url(request))


async def wado_frames(request: Request) -> Response | SizedStream:
    """Frames by a routed request: HEAD (GET takes :class:`FramesFastPath`)."""
    state, scope = _state(request), _scope_of(request)
    _allow(request, state.policy, scope["StudyInstanceUID"])
    frame_list = request.path_params["frames"]
    return await retrieve_frames(request, state.registry, state.federation, scope, frame_list)


async def wado_bulk(request: Request) -> Response | SizedStream:
    state, scope = _state(request), _scope_of(request)
    _allow(request, state.policy, scope["StudyInstanceUID"])
    tag_path = request.path_params["tag_path"]
    return await retrieve_bulk(request, state.registry, state.federation, scope, tag_path)


async def health(request: Request) -> Response:
    return PlainTextResponse(f"ok {__version__}\n")


# Relative to urls.DICOMWEB, where the application mounts them.
ROUTES = [
    Route(urls.QIDO_STUDIES, qido_studies),
    Route(urls.QIDO_SERIES, qido_series),
    Route(urls.QIDO_INSTANCES, qido_instances),
    Route(urls.QIDO_STUDY_SERIES, qido_series),
    Route(urls.QIDO_STUDY_INSTANCES, qido_instances),
    Route(urls.QIDO_SERIES_INSTANCES, qido_instances),
    Route(urls.STUDY, wado_instances),
    Route(urls.SERIES, wado_instances),
    Route(urls.INSTANCE, wado_instances),
    Route(urls.STUDY_METADATA, wado_metadata),
    Route(urls.SERIES_METADATA, wado_metadata),
    Route(urls.INSTANCE_METADATA, wado_metadata),
    Route(urls.FRAMES, wado_frames),  # GET is served by FramesFastPath
    Route(urls.BULK, wado_bulk),
]


class FramesFastPath:
    """ASGI: frame GETs answered here, everything else (lifespan included) passed to ``app``.

    Holds the same :class:`DicomwebState` as the application's state rather than looking it up:
    this path does nothing per request that it does not need."""

    def __init__(self, app: ASGIApp, state: DicomwebState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = urls.FRAMES_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        study, series, instance, frame_list = match.groups()
        uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
        state = self.state
        try:
            _allow(request, state.policy, study)
            response = await retrieve_frames(request, state.registry, state.federation, uids, frame_list)
        except Exception as exc:
            response = await (gateway_error if isinstance(exc, GatewayError) else unexpected)(request, exc)
        await response(scope, receive, send)
