"""WADO-RS metadata (PS3.18 10.4.1.1.2): the DICOM JSON stored at harvest, joined and streamed.

No dataset is parsed here: each instance's JSON fragment is stored as bytes, and BulkDataURIs are
completed with this gateway's base URL by one ``bytes.replace`` per fragment (see ``record``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.dicomweb.accept import parse_accept
from gateway.dicomweb.scope import not_found
from gateway.errors import GatewayError, NotAcceptable
from gateway.registry.record import BULK_KEY
from gateway.registry.store import Registry
from gateway.stream.federation import Federation
from gateway.types import InstanceFile

__all__ = ["retrieve_metadata"]

_CHUNK = 256 * 1024
log = logging.getLogger("gateway.wado")


async def retrieve_metadata(
    request: Request, registry: Registry, federation: Federation, scope: dict[str, str], base_url: str
) -> Response:
    _require_json(request)
    await _complete_partial(registry, federation, scope)
    fragments = await anyio.to_thread.run_sync(registry.metadata, scope)
    if not fragments:
        raise not_found(scope)
    prefix = BULK_KEY + base_url.encode()

    async def body() -> AsyncIterator[bytes]:
        pending: list[bytes] = [b"["]
        size = 1
        for index, fragment in enumerate(fragments):
            if index:
                pending.append(b",")
            pending.append(fragment.replace(BULK_KEY, prefix))
            size += len(fragment)
            if size >= _CHUNK:
                yield b"".join(pending)
                pending, size = [], 0
        pending.append(b"]")
        yield b"".join(pending)

    return StreamingResponse(body(), media_type="application/dicom+json")


async def _complete_partial(
    registry: Registry, federation: Federation, scope: dict[str, str]
) -> None:
    """A source that ``learns_on_retrieve`` (a DIMSE PACS, whose search answers hold a few
    attributes) indexes an instance's full header when it is first retrieved. Metadata asked for
    before that: retrieve those instances now (in one retrieval per series where the source can
    send a batch; the pixels kept only where the source's cache has room to spare), then answer."""
    instances = await anyio.to_thread.run_sync(registry.instance_files, scope)
    runs: dict[tuple[str, str], list[InstanceFile]] = {}
    for alternatives in instances:
        if all(a.remote and a.TransferSyntaxUID is None for a in alternatives):
            first = alternatives[0]
            source = federation.sources.get(first.source)
            if source is not None and source.learns_on_retrieve:
                runs.setdefault((first.source, first.path.split("/instances/")[0]), []).append(first)
    for (name, _), files in runs.items():
        source = federation.sources[name]
        try:
            if source.batch is not None:
                async for _ in source.batch.aiter_instances(files):
                    pass  # learning happens as each instance arrives
            else:
                for file in files:
                    async for _ in source.aiter_instance(file):
                        pass
        except GatewayError as exc:  # answer with what the search gave rather than not at all
            log.warning("metadata from source %s stays partial: %s", name, exc.message)


def _require_json(request: Request) -> None:
    for media_range in parse_accept(request.headers.get("accept")):
        if media_range.type in ("*/*", "application/*", "application/dicom+json", "application/json"):
            return
    raise NotAcceptable("metadata is available as application/dicom+json only (XML is not supported)")
