"""Starting a streamed response so that early failures are clean errors and late ones abort."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import SourceError

__all__ = ["stream", "sized_stream", "SizedStream"]

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


class SizedStream:
    """A response of known length streamed with no task of its own, for one remote frame.

    Starlette's StreamingResponse runs a task per response to notice a client hanging up, which
    costs more than the frame. A frame is bounded in size, so after a hang-up the rest of it is
    read from the source and dropped. A body longer or shorter than announced aborts the
    connection (uvicorn refuses to end it), so a cut frame never looks complete."""

    def __init__(self, first: bytes, rest: AsyncIterator[bytes], media_type: str, length: int, path: str):
        self.first, self.rest = first, rest
        self.headers = [
            (b"content-type", media_type.encode("latin-1")),
            (b"content-length", str(length).encode("ascii")),
        ]
        self.length, self.path = length, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        sent = len(self.first)
        await send({"type": "http.response.body", "body": self.first, "more_body": True})
        try:
            async for chunk in self.rest:
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if sent != self.length:
                raise SourceError(f"sent {sent} of {self.length} bytes")
        except Exception as exc:
            message = getattr(exc, "message", None) or repr(exc)
            log.error("%s %s aborted mid-stream: %s", scope["method"], self.path, message)
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def sized_stream(
    body: AsyncIterator[bytes], request: Request, media_type: str, length: int
) -> SizedStream:
    """``stream`` for a short body of known length (see ``SizedStream``)."""
    first = await anext(body)
    return SizedStream(first, body, media_type, length, request.url.path)
