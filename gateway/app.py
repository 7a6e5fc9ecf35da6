"""The HTTP application, assembled: DICOMweb under ``urls.DICOMWEB``, the access API, the viewer,
the error answers, and harvest and the audit writer running in the background.

From the outside in, a request meets the access middleware (who is calling, one audit record),
then the frames fast path (frame GETs answered there), then Starlette's routing. The endpoints
are module-level functions that find what they serve from in ``app.state``: ``dicomweb`` (a
:class:`DicomwebState`) and ``access``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from gateway import urls
from gateway.access.control import Access
from gateway.api import audit, changes, emergency, fhir, grants, hidden, iid, links, priors, subscriptions
from gateway.api.error_handlers import EXCEPTION_HANDLERS
from gateway.api.middleware import AccessMiddleware
from gateway.dicomweb import endpoints
from gateway.dicomweb.endpoints import DicomwebState, FramesFastPath
from gateway.notify.dispatch import Dispatcher
from gateway.notify.store import SubscriptionStore
from gateway.service import Gateway
from gateway.viewer.routes import viewer_routes

__all__ = ["create_app"]


def create_app(gateway: Gateway, harvest: bool = False, access: Access | None = None) -> AccessMiddleware:
    """``harvest=True`` runs each source's harvest schedule while the app is up."""
    access = access or Access(gateway.config, gateway.registry)
    app = Starlette(
        routes=[
            Route(urls.HEALTH, endpoints.health),
            Mount(urls.DICOMWEB, routes=endpoints.ROUTES),
            *links.ROUTES,
            *grants.ROUTES,
            *hidden.ROUTES,
            *emergency.ROUTES,
            *audit.ROUTES,
            *changes.ROUTES,
            *subscriptions.ROUTES,
            *fhir.ROUTES,
            *priors.ROUTES,
            *iid.ROUTES,
            *viewer_routes(gateway.config.data_dir / "viewer"),
        ],
        lifespan=functools.partial(_lifespan, gateway=gateway, access=access, harvest=harvest),
        exception_handlers=EXCEPTION_HANDLERS,
    )
    state = DicomwebState(gateway.registry, gateway.federation, access.policy)
    app.state.dicomweb = state
    app.state.access = access
    app.state.notify = Dispatcher(
        SubscriptionStore(access.store.db),
        access.policy,
        gateway.registry.changes,
        gateway.config.notify,
        gateway.config.server.base_url,
        access.audit.append,
        last=gateway.registry.last_change,
        namespaces={issuer.issuer: issuer.organizations_of for issuer in access.config.issuers},
    )
    wrapped = AccessMiddleware(FramesFastPath(app, state), access)
    wrapped.starlette = app  # the route table, for tests that must cover every route
    return wrapped


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette, gateway: Gateway, access: Access, harvest: bool) -> AsyncIterator[None]:
    """While the app is up: the audit writer, and each source's harvest schedule if asked; then
    the access store, the sources and the registry are closed."""
    async with anyio.create_task_group() as group:
        if harvest:
            for source_config in gateway.config.sources:
                group.start_soon(gateway.harvest_forever, source_config)
            # the change feed's study announcements, each pass that announced waking the worker
            group.start_soon(functools.partial(gateway.announce_forever, announced=app.state.notify.wake))
            group.start_soon(app.state.notify.run)  # subscriptions: the outbox delivered
            # retention of the feed and the outbox, hourly
            group.start_soon(gateway.prune_forever, app.state.notify.store)
        group.start_soon(access.audit.run)
        yield
        group.cancel_scope.cancel()
    access.close()
    await gateway.aclose()
