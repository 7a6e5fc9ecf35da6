"""Choosing among an instance's locations, once, above every source kind.

The same SOP instance may be held by several sources (a folder and the PACS it mirrors, two
sites). Locations are tried healthy first, then by configured priority; a location that fails
before its first byte is sent falls over to the next; once a byte is sent, the response stays with
that location (a failure then aborts it). A source that was unreachable or missed a deadline
(``SourceUnavailable``, ``SourceTimeout``: each source keeps its own deadlines, from its
configuration) is tried last for a short while, so one dead PACS does not cost every request a
timeout. ``memory.MemorySource`` exercises all of this without a peer (tests/stream).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from gateway.errors import GatewayError, NotFound, SourceError, SourceTimeout, SourceUnavailable
from gateway.stream.source import Source

__all__ = ["Federation", "Opened", "started"]

log = logging.getLogger("gateway.federation")
_DOWN_FOR = 30.0  # seconds a failed source is tried last
_UNREACHABLE = (SourceUnavailable, SourceTimeout)  # what makes a source tried last


class _Located(Protocol):
    @property
    def source(self) -> str: ...


T = TypeVar("T", bound=_Located)
R = TypeVar("R")
Opened = tuple[T, bytes, AsyncIterator[bytes]]


class Federation:
    def __init__(self, sources: dict[str, Source], priorities: dict[str, int]) -> None:
        self.sources = sources
        self.priorities = priorities
        self._down_until: dict[str, float] = {}

    def order(self, alternatives: Sequence[T]) -> list[T]:
        """Healthy sources first, then by configured priority (lower first)."""
        now = time.monotonic()
        return sorted(
            alternatives,
            key=lambda a: (self._down_until.get(a.source, 0.0) > now, self.priorities.get(a.source, 1 << 30)),
        )

    async def first(
        self, alternatives: Sequence[T], opener: Callable[[Source, T], Awaitable[R]]
    ) -> tuple[T, R]:
        """The first location whose ``opener`` succeeds, and what it opened. ``opener`` does what
        must happen before the first byte is sent (``Source.open_frame``, or ``started``): a
        location failing in it falls over to the next."""
        errors: list[GatewayError] = []
        for alternative in self.order(alternatives):
            source = self.sources.get(alternative.source)
            if source is None:
                errors.append(SourceError(f"source {alternative.source!r} is no longer configured"))
                continue
            try:
                opened = await opener(source, alternative)
            except GatewayError as exc:
                if isinstance(exc, _UNREACHABLE):
                    self._down_until[alternative.source] = time.monotonic() + _DOWN_FOR
                if len(alternatives) > 1:
                    log.warning(
                        "source %s failed, trying the next location: %s", alternative.source, exc.message
                    )
                errors.append(exc)
                continue
            self._down_until.pop(alternative.source, None)
            return alternative, opened
        raise _combined(errors)

    async def open(
        self, alternatives: Sequence[T], opener: Callable[[Source, T], AsyncIterator[bytes]]
    ) -> tuple[T, bytes, AsyncIterator[bytes]]:
        """The first location that delivers a first chunk: (location, first chunk, the rest)."""
        located, (head, rest) = await self.first(alternatives, lambda source, a: started(opener(source, a)))
        return located, head, rest


async def started(stream: AsyncIterator[bytes]) -> tuple[bytes, AsyncIterator[bytes]]:
    """A stream's first chunk (b"" when it is empty) and the stream; a stream failing before its
    first chunk is closed, releasing what its source held for it."""
    try:
        return await anext(stream, b""), stream
    except GatewayError:
        close = getattr(stream, "aclose", None)  # async generators: release the source now
        if close is not None:
            await close()
        raise


def _combined(errors: list[GatewayError]) -> GatewayError:
    if len(errors) == 1:
        return errors[0]
    message = "no location could deliver it: " + "; ".join(e.message for e in errors)
    if all(isinstance(e, NotFound) for e in errors):
        return NotFound(message)
    worst = next(e for e in errors if not isinstance(e, NotFound))
    return type(worst)(message)
