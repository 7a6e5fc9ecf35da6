"""Starting a streamed response so that early failures are clean errors and late ones abort."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

__all__ = ["stream"]

log = logging.getLogger("gateway.wado")


async def stream(
    body: AsyncIterator[bytes], request: Request, media_type: str, headers: dict[str, str]
) -> StreamingResponse:
    """Start ``body`` before the response: errors up to its first chunk become a clean 4xx/5xx.
    Later errors are logged and re-raised, so the server aborts the connection instead of ending
    the response cleanly (a cut response must not look complete)."""
    first = await anext(body)

    async def rest() -> AsyncIterator[bytes]:
        yield first
        try:
            async for chunk in body:
                yield chunk
        except Exception as exc:
            message = getattr(exc, "message", None) or repr(exc)
            log.error("%s %s aborted mid-stream: %s", request.method, request.url.path, message)
            raise

    return StreamingResponse(rest(), media_type=media_type, headers=headers)
