"""The one contract every source kind implements (folder now; DIMSE and DICOMweb PACS later).

Harvest asks a source what it holds (``scan``) and for each new or changed entry its header
(``read_header``); the registry stores the result. Serving asks for bytes by location:
``aiter_instance`` streams a whole Part 10 file, ``aiter_frame`` one frame, both as chunks of at most
``CHUNK`` bytes, so memory does not depend on the size of what is sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from pydicom.dataset import Dataset

from gateway.types import Entry, InstanceFile, Location, PixelInfo

__all__ = ["Source", "CHUNK"]

CHUNK = 1024 * 1024


class Source(Protocol):
    name: str
    kind: str

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

    def aiter_frame(
        self, location: Location, index: int, meta: dict[str, int] | None = None
    ) -> AsyncIterator[bytes]:
        """The bytes of frame ``index`` (0-based), little endian, as stored otherwise. A remote
        source that learns the frame's length before its first byte puts it in ``meta["length"]``
        (the response can then carry a Content-Length)."""
        ...

    def aiter_bulk(self, location: Location, tag_path: str) -> AsyncIterator[bytes]:
        """The value of a binary element other than Pixel Data ('TAG' or 'SEQ/index/TAG...')."""
        ...

    async def health(self) -> str:
        """ "ok", or a sentence saying what is wrong."""
        ...

    async def aclose(self) -> None: ...
