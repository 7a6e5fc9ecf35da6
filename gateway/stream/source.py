"""The one contract every source kind implements: a folder, a DIMSE PACS, a DICOMweb PACS, and
``memory.MemorySource``, the in-package fake that tests and benchmarks use (httpx's transports and
its ``MockTransport`` are the model).

Harvest asks a source what it holds (``scan``) and, for each new or changed entry, its header
(``read_header``); the registry stores the result. Serving asks for bytes by location:

* ``aiter_instance`` streams a whole Part 10 file and ``aiter_bulk`` the value of one binary
  element, as chunks of at most ``CHUNK`` bytes, so memory does not depend on what is sent;
* ``open_frame`` does what must happen before a frame's first byte (a file read, an upstream's
  headers received, an instance retrieved) and returns a ``Frame``: that first chunk, the rest, and
  the frame's length when the source knows it by then (the response can carry a Content-Length).

A source fails before its first byte, or not at all: up to then the federation
(``federation.Federation``) may still try the instance's next location; after it, an error aborts
the response.

What only some sources do is declared, never guessed from the class:

* ``batch``: a ``BatchRetrieval`` when the source sends many instances of one series in one
  retrieval (a DIMSE C-GET of a UID list, PS3.4 C.4.3.2.1), else None.
* ``learns_on_retrieve``: True when what harvest indexes of an instance is partial (a C-FIND
  response identifier holds the keys asked for and little else, PS3.4 C.4.1.1.3.2) and its full
  header is learnt when the instance is first retrieved. Metadata retrieves such instances first.
* ``watch``: a ``Watcher`` when the source can say at once what changed (a folder, through the
  kernel's file notifications), so harvest need not wait for its interval and reads only what
  changed; else None (remote sources are asked again every ``interval``).

What a source calls back into the service (``learn`` for a DIMSE PACS, ``changed`` for a folder) is
given to its constructor; nothing is assigned to a source from outside.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterator
from typing import NamedTuple, Protocol

from pydicom.dataset import Dataset

from gateway.types import Entry, InstanceFile, Location, PixelInfo

__all__ = ["Source", "BatchRetrieval", "Watcher", "Stop", "Frame", "CHUNK"]

CHUNK = 1024 * 1024


class Frame(NamedTuple):
    """One frame whose first chunk is in hand: what ``Source.open_frame`` returns."""

    first: bytes
    rest: AsyncIterator[bytes] | None  # the chunks after ``first``; None when ``first`` is all of it
    length: int | None  # bytes in the whole frame, when known before its first byte

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """Every chunk of the frame, ``first`` included."""
        yield self.first
        if self.rest is not None:
            async for chunk in self.rest:
                yield chunk


class BatchRetrieval(Protocol):
    """A source's way of sending many instances at once (``Source.batch``)."""

    def aiter_instances(self, locations: list[InstanceFile]) -> AsyncGenerator[bytes, None]:
        """The Part 10 bytes of each instance at ``locations`` (one series of this source), in the
        order the source sends them; fewer than asked when the source does not send them all.
        A generator: a caller that stops early closes it (``contextlib.aclosing``), and the
        source stops the retrieval then, not when the garbage collector gets to it."""
        ...


class Stop(Protocol):
    """What ends a watch: an ``anyio.Event`` (or any event whose ``is_set`` may be asked from
    another thread, as watchfiles does)."""

    def is_set(self) -> bool: ...


class Watcher(Protocol):
    """A source's way of saying at once what changed (``Source.watch``)."""

    async def watch_changes(self, changed: Callable[[set[str]], None], stop: Stop) -> None:
        """Call ``changed`` (on the event loop) with the paths that changed, as ``scan`` names
        them (``""``: anything, list it all), each set gathered over a short debounce, until
        ``stop`` is set. Raises ``SourceError`` when the source cannot be watched."""
        ...

    def scan_paths(self, paths: Collection[str]) -> Iterator[Entry]:
        """What ``scan`` would list at or under each of ``paths`` (blocking): nothing for a path
        gone, and for a path below an entry ``scan`` does not walk into, that entry."""
        ...


class Source(Protocol):
    name: str
    kind: str
    batch: BatchRetrieval | None
    learns_on_retrieve: bool
    watch: Watcher | None

    def scan(self, since: str | None = None) -> Iterator[Entry]:
        """What the source holds now (blocking; harvest runs it in a worker thread): everything,
        or for remote sources, studies dated ``since`` (YYYYMMDD) or later."""
        ...

    def read_header(self, entry: Entry) -> tuple[Dataset, PixelInfo | None]:
        """The entry's header without pixel data; raises ``DicomFileError`` if unreadable."""
        ...

    def aiter_instance(self, location: InstanceFile) -> AsyncIterator[bytes]:
        """The stored Part 10 bytes of one instance."""
        ...

    async def open_frame(self, location: Location, index: int) -> Frame:
        """Frame ``index`` (0-based), little endian, as stored otherwise, its first chunk read."""
        ...

    def aiter_bulk(self, location: Location, tag_path: str) -> AsyncIterator[bytes]:
        """The value of a binary element other than Pixel Data ('TAG' or 'SEQ/index/TAG...')."""
        ...

    async def health(self) -> str:
        """ "ok", or a sentence saying what is wrong."""
        ...

    async def aclose(self) -> None: ...
