"""The HTTP application: DICOMweb under ``/dicom-web``, the access API, the viewer, one error
handler, harvest and the audit writer in the background.

Every request passes the access middleware (who is calling, one audit record); every DICOMweb
endpoint asks the access policy first: QIDO for the caller's restriction, WADO for the study.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import __version__
from gateway.access.identity import Principal
from gateway.access.service import Access
from gateway.api.middleware import AccessMiddleware, audit_of, logged_path
from gateway.api.routes import api_routes
from gateway.dicomweb.metadata import retrieve_metadata
from gateway.dicomweb.retrieve import retrieve_bulk, retrieve_frames, retrieve_instances
from gateway.dicomweb.search import search
from gateway.dicomweb.streaming import SizedStream
from gateway.errors import GatewayError
from gateway.redact import escape
from gateway.service import Gateway
from gateway.viewer.routes import viewer_routes

__all__ = ["create_app"]

log = logging.getLogger("gateway.http")
PREFIX = "/dicom-web"
_FRAMES = re.compile(PREFIX + r"/studies/([^/]+)/series/([^/]+)/instances/([^/]+)/frames/([^/]+)$")


def create_app(gateway: Gateway, harvest: bool = False, access: Access | None = None) -> ASGIApp:
    """``harvest=True`` runs each source's harvest schedule while the app is up."""
    access = access or Access(gateway.config, gateway.registry)
    policy = access.policy

    def allow(request: Request, study: str) -> None:
        """The policy's decision on one study, noted for the audit record; raises a refusal."""
        principal: Principal = request.scope["state"]["principal"]
        allowed = policy.check_study(principal, study)
        noted = audit_of(request.scope)
        noted["patient"], noted["emergency"] = allowed.patient, allowed.emergency

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/") + PREFIX

    def scope_of(request: Request) -> dict[str, str]:
        params = request.path_params
        out = {"StudyInstanceUID": params["study"]}
        if "series" in params:
            out["SeriesInstanceUID"] = params["series"]
        if "instance" in params:
            out["SOPInstanceUID"] = params["instance"]
        return out

    def qido(level: str):
        async def endpoint(request: Request) -> Response:
            scope = scope_of(request) if "study" in request.path_params else {}
            if scope:
                allow(request, scope["StudyInstanceUID"])
            principal = request.scope["state"]["principal"]
            restriction = policy.restriction(principal)
            patients: set[str] = set()
            response = await search(
                request, gateway.registry, level, scope, base_url(request), restriction, patients
            )
            # The record names every patient whose studies the answer carried, and whether any
            # was seen by emergency rules only.
            noted = audit_of(request.scope)
            noted["patients"] = sorted(patients)
            noted["emergency"] = noted.get("emergency") or policy.emergency_among(principal, patients)
            return response

        return endpoint

    async def instances(request: Request) -> Response:
        allow(request, request.path_params["study"])
        return await retrieve_instances(
            request, gateway.registry, gateway.federation, scope_of(request), base_url(request)
        )

    async def metadata(request: Request) -> Response:
        allow(request, request.path_params["study"])
        return await retrieve_metadata(
            request, gateway.registry, gateway.federation, scope_of(request), base_url(request)
        )

    async def frames(request: Request) -> Response | SizedStream:
        allow(request, request.path_params["study"])
        return await retrieve_frames(
            request, gateway.registry, gateway.federation, scope_of(request), request.path_params["frames"]
        )

    async def bulk(request: Request) -> Response | SizedStream:
        allow(request, request.path_params["study"])
        return await retrieve_bulk(
            request, gateway.registry, gateway.federation, scope_of(request), request.path_params["tag_path"]
        )

    async def health(request: Request) -> Response:
        return PlainTextResponse(f"ok {__version__}\n")

    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    routes = [
        Route("/studies", qido("study")),
        Route("/series", qido("series")),
        Route("/instances", qido("instance")),
        Route(study + "/series", qido("series")),
        Route(study + "/instances", qido("instance")),
        Route(series + "/instances", qido("instance")),
        Route(study, instances),
        Route(series, instances),
        Route(instance, instances),
        Route(study + "/metadata", metadata),
        Route(series + "/metadata", metadata),
        Route(instance + "/metadata", metadata),
        Route(instance + "/frames/{frames}", frames),  # GET is served by the fast path below
        Route(instance + "/bulk/{tag_path:path}", bulk),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as group:
            if harvest:
                for source_config in gateway.config.sources:
                    group.start_soon(gateway.harvest_forever, source_config)
            group.start_soon(access.audit.run)
            yield
            group.cancel_scope.cancel()
        access.close()
        await gateway.aclose()

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        audit_of(request.scope)["refusal"] = exc.message
        if exc.status == 401:
            headers = {"WWW-Authenticate": 'Bearer realm="gateway"'}
            return PlainTextResponse(exc.message + "\n", status_code=exc.status, headers=headers)
        path = logged_path(request.url.path)
        if exc.status >= 500:
            log.error("%s %s -> %d: %s", request.method, path, exc.status, exc.message)
        else:
            log.info("%s %s -> %d: %s", request.method, path, exc.status, exc.message)
        return PlainTextResponse(exc.message + "\n", status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = exc.detail
        if exc.status_code == 404:
            detail = f"no resource at {logged_path(request.url.path)}"
        elif exc.status_code == 405:
            detail = f"{escape(request.method, 16)} is not supported on {logged_path(request.url.path)}"
        return PlainTextResponse(f"{detail}\n", status_code=exc.status_code, headers=exc.headers)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, logged_path(request.url.path))
        return PlainTextResponse(f"internal error: {type(exc).__name__}\n", status_code=500)

    app = Starlette(
        routes=[
            Route("/health", health),
            Mount(PREFIX, routes=routes),
            *api_routes(access),
            *viewer_routes(gateway.config.data_dir / "viewer"),
        ],
        lifespan=lifespan,
        exception_handlers={GatewayError: gateway_error, HTTPException: http_error, Exception: unexpected},
    )

    async def with_frames_fast_path(scope: Scope, receive: Receive, send: Send) -> None:
        """Frame requests, the hot path (one per image of a study), skip routing and the
        middleware stack; everything else, lifespan included, goes to the Starlette app."""
        match = _FRAMES.match(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] != "GET":
            await app(scope, receive, send)
            return
        request = Request(scope, receive)
        study, series, instance, frame_list = match.groups()
        uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
        try:
            allow(request, study)
            response = await retrieve_frames(request, gateway.registry, gateway.federation, uids, frame_list)
        except Exception as exc:
            response = await (gateway_error if isinstance(exc, GatewayError) else unexpected)(request, exc)
        await response(scope, receive, send)

    wrapped = AccessMiddleware(with_frames_fast_path, access)
    wrapped.starlette = app  # the route table, for tests that must cover every route
    return wrapped
