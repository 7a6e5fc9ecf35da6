"""WADO-RS metadata (PS3.18 10.4.1.1.2): the DICOM JSON stored at harvest, joined and streamed.

No dataset is parsed here: each instance's JSON fragment is stored as bytes, and BulkDataURIs are
completed with this gateway's base URL by one ``bytes.replace`` per fragment (see ``record``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.dicomweb.accept import parse_accept
from gateway.dicomweb.scope import not_found, where
from gateway.errors import NotAcceptable
from gateway.registry.record import BULK_KEY
from gateway.service import Gateway

__all__ = ["retrieve_metadata"]

_CHUNK = 256 * 1024


async def retrieve_metadata(
    request: Request, gateway: Gateway, scope: dict[str, str], base_url: str
) -> Response:
    _require_json(request)
    condition, params = where(scope)
    fragments = await anyio.to_thread.run_sync(gateway.registry.metadata, condition, params)
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


def _require_json(request: Request) -> None:
    for media_range in parse_accept(request.headers.get("accept")):
        if media_range.type in ("*/*", "application/*", "application/dicom+json", "application/json"):
            return
    raise NotAcceptable("metadata is available as application/dicom+json only (XML is not supported)")
