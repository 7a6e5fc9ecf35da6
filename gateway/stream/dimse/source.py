"""A PACS over DIMSE as a source (pynetdicom as SCU): C-ECHO for health, C-FIND to harvest
(``dimse_query``), C-GET or C-MOVE to retrieve (``dimse_retrieve``), nothing written to disk.

Associations are reused from a small pool (``associations``). Deadlines: ``connect`` for
association set-up, ``message`` for each DIMSE message, ``total`` for a whole operation
(``dimse_replies``).

A C-FIND answer holds few attributes (PS3.4 C.4.1.1.3.2), so the source declares
``learns_on_retrieve``: the first time an instance is retrieved, its whole header goes to ``learn``
(given by the service) to complete the index. It declares ``batch`` too: a series' instances come
in one C-GET of a UID list (PS3.4 C.4.3.2.1). Received instances are kept for a while (a viewer
asks for every frame of an instance, one request each), within ``_CACHE_BYTES``.

With ``ian_port``, it declares ``watch``: the PACS's Instance Availability Notifications (PS3.4
Annex R, ``ianscp``) name the study or series to harvest at once, listed by a C-FIND
restricted to them (``scan_paths``); without, it is asked again every interval only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pynetdicom import _config

from gateway.codec.dicomfile import bulk_value, frame_of
from gateway.config import SourceConfig
from gateway.errors import DicomFileError, GatewayError, NotFound, SourceError
from gateway.stream.dimse import query as dimse_query
from gateway.stream.dimse.associations import QUERIES, AssociationPool
from gateway.stream.dimse.ianscp import watch_notifications
from gateway.stream.dimse.replies import Replies
from gateway.stream.dimse.retrieve import Retriever, Uids
from gateway.stream.source import CHUNK, BatchRetrieval, Frame, Stop, Watcher
from gateway.types import Entry, InstanceFile, Location

__all__ = ["DimseSource", "Learn"]

log = logging.getLogger("gateway.dimse")

# pynetdicom formats every identifier it sends or receives for its debug log, whatever the log
# level: a third of a C-FIND harvest's time. The gateway logs per request instead.
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_REQUEST_IDENTIFIERS = False

_CACHE_BYTES = 128 * 1024 * 1024  # received instances kept for their other frames

# What the service does with an instance's Part 10 bytes the first time they come: (its location's
# path, the bytes). Called in a worker thread.
Learn = Callable[[str, bytes], None]


class DimseSource:
    kind = "dimse"
    learns_on_retrieve = True  # C-FIND answers are partial; headers are learnt on retrieve
    # Asked again every interval, and at once for what its notifications name (``ian_port``).
    watch: Watcher | None = None

    def __init__(self, config: SourceConfig, learn: Learn | None = None) -> None:
        assert config.host is not None
        self.name = config.name
        self.config = config
        self.deadlines = config.deadlines
        self.learn = learn
        self.batch: BatchRetrieval | None = self  # ``aiter_instances``
        self.watch = self if config.ian_port is not None else None  # ``watch_changes``, ``scan_paths``
        self._associations = AssociationPool(config.name, config)
        self._replies = Replies(config.name, config.deadlines)
        self._threads: ThreadPoolExecutor | None = None
        self._retriever = Retriever(config, self._associations, self._replies, self._pool)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._fetching: dict[str, asyncio.Future[bytes]] = {}

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a DIMSE source harvests in its own process")

    # -- harvest: C-FIND (blocking, in a worker thread) ---------------------------------------------

    def scan(self, since: str | None = None) -> Iterator[Entry]:
        return dimse_query.scan(self._associations, self._replies, since)

    def scan_paths(self, paths: Collection[str]) -> Iterator[Entry]:
        """What ``scan`` lists at or under ``paths`` (a study's, a series'), by C-FINDs restricted
        to them: what the PACS answers is indexed, never what a notification said."""
        return dimse_query.scan_paths(self._associations, self._replies, paths)

    async def watch_changes(self, changed: Callable[[set[str]], None], stop: Stop) -> None:
        """The PACS's Instance Availability Notifications, as the paths of what they name."""
        await watch_notifications(self.name, self.config, changed, stop)

    def read_header(self, entry: Entry) -> Any:
        raise SourceError(f"source {self.name}: entries come with their attributes")  # never called

    # -- retrieve: C-GET or C-MOVE ------------------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(8, thread_name_prefix=f"dimse-{self.name}")
        return self._threads

    async def aiter_instance(self, location: InstanceFile) -> AsyncIterator[bytes]:
        data = await self._instance(location)
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]

    async def open_frame(self, location: Location, index: int) -> Frame:
        data = await self._instance(location)
        try:
            frame = await asyncio.get_running_loop().run_in_executor(self._pool(), frame_of, data, index)
        except GatewayError as exc:
            raise SourceError(f"source {self.name}: {exc.message}") from exc
        return Frame(frame, None, len(frame))

    async def aiter_bulk(self, location: Location, tag_path: str) -> AsyncIterator[bytes]:
        data = await self._instance(location)
        try:
            yield await asyncio.get_running_loop().run_in_executor(
                self._pool(), bulk_value, data, tag_path, location.SOPInstanceUID
            )
        except DicomFileError as exc:
            raise SourceError(f"source {self.name}: {exc.message}") from exc

    async def _instance(self, location: Location | InstanceFile) -> bytes:
        """One instance, from the cache, from a retrieval already under way (a viewer asks for
        several frames of an instance at once), or from a new retrieval."""
        uid = location.SOPInstanceUID
        cached = self._cache.get(uid)
        if cached is not None:
            self._cache.move_to_end(uid)
            return cached
        pending = self._fetching.get(uid)
        if pending is not None:
            return await asyncio.shield(pending)
        fetch = asyncio.ensure_future(self._fetch(location))
        self._fetching[uid] = fetch
        try:
            return await asyncio.shield(fetch)
        finally:
            if fetch.done():
                self._fetching.pop(uid, None)
            else:
                fetch.add_done_callback(lambda _: self._fetching.pop(uid, None))

    async def _fetch(self, location: Location | InstanceFile) -> bytes:
        uid, path = location.SOPInstanceUID, location.path
        retrieval = self._retriever.aiter_received(_uids(path), location.SOPClassUID)
        received = [data async for _, data in retrieval]
        if not received:
            raise NotFound(f"source {self.name} sent nothing for instance {uid}")
        data = received[0]  # its UIDs are the ones asked for (``dimse_retrieve``)
        await self._learn(location, data)
        self._remember(uid, data)
        return data

    async def _learn(self, location: Location | InstanceFile, data: bytes) -> None:
        """The first time an instance comes, its full header completes the index (metadata,
        stored syntax, frame count), which C-FIND alone could not give. Only then: an instance
        the index knows the stored syntax of was learnt already (a harvest that finds it changed
        at the PACS forgets it), and learning it again is a write per instance on the retrieval's
        path for nothing."""
        if self.learn is not None and location.TransferSyntaxUID is None:
            await asyncio.get_running_loop().run_in_executor(self._pool(), self.learn, location.path, data)

    def _remember(self, uid: str, data: bytes, spare: bool = False) -> None:
        """Keep a received instance for its other frames, the least recently used going first.
        ``spare``: it came in a batch (a series retrieved, /metadata completed, priors prefetched),
        which no viewer waits on this instant: it is kept only in room the cache has spare, at the
        cold end (the next instance a viewer retrieves pushes it out first), and never in place of
        a copy already kept. So a batch, however large, never evicts what a viewer is reading."""
        if spare:
            if uid not in self._cache and self._cached + len(data) <= _CACHE_BYTES:
                self._cache[uid] = data
                self._cache.move_to_end(uid, last=False)
                self._cached += len(data)
            return
        previous = self._cache.pop(uid, None)
        if previous is not None:
            self._cached -= len(previous)
        self._cache[uid] = data
        self._cached += len(data)
        while self._cached > _CACHE_BYTES and len(self._cache) > 1:
            self._cached -= len(self._cache.popitem(last=False)[1])

    async def aiter_instances(self, locations: list[InstanceFile]) -> AsyncGenerator[bytes, None]:
        """Several instances of one series with one C-GET (a UID list, PS3.4 C.4.3.2.1), each as
        Part 10 bytes in the order the PACS sends them: a series streams at the PACS's pace
        instead of one request per instance."""
        study, series, _ = _uids(locations[0].path)
        classes = {location.SOPClassUID for location in locations}
        sop_class = classes.pop() if len(classes) == 1 else None
        by_uid = {location.SOPInstanceUID: location for location in locations}
        uids: Uids = (study, series, [location.SOPInstanceUID for location in locations])
        log.info("source %s: %d instances of series %s in one retrieval", self.name, len(locations), series)
        async for uid, data in self._retriever.aiter_received(uids, sop_class):
            await self._learn(by_uid[uid], data)
            self._remember(uid, data, spare=True)  # its frames next, at memory speed if room
            yield data

    # -- health and shutdown ------------------------------------------------------------------------

    async def health(self) -> str:
        def echo() -> str:
            try:
                with self._associations.acquire(QUERIES) as assoc:
                    status = assoc.send_c_echo()
            except GatewayError as exc:
                return exc.message
            return "ok" if status and int(status.Status) == 0 else "C-ECHO failed"

        return await asyncio.get_running_loop().run_in_executor(self._pool(), echo)

    async def aclose(self) -> None:
        self._associations.close()
        self._retriever.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False)


def _uids(path: str) -> tuple[str, str, str]:
    parts = path.strip("/").split("/")  # studies/S/series/SE/instances/I
    return parts[1], parts[3], parts[5]
