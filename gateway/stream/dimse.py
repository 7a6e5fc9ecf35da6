"""A PACS over DIMSE as a source (pynetdicom as SCU): C-ECHO for health, C-FIND to harvest,
C-GET or C-MOVE to retrieve, nothing written to disk.

pynetdicom is threaded; each retrieval runs in a worker thread and hands every received instance
to the async response through a bounded queue (``asyncio.Queue(2)``): a slow client slows the
C-GET instead of filling memory. Associations are reused from a small pool.

Deadlines: ``connect`` for association set-up, ``message`` for each DIMSE message (pynetdicom's
DIMSE and network timeouts), ``total`` for a whole C-FIND or C-GET: a stream of "pending" replies
does not reset it (pynetdicom#825), and the association is aborted when it passes.
Partial C-GET/C-MOVE (sub-operations failed: status B000 or a failure) is an error (pynetdicom#552).

Received data must be what was asked for: each instance that comes (C-GET on our association,
C-MOVE on our Storage SCP) is kept only when its data set's own Study, Series and SOP Instance UIDs
are those of a retrieval under way, and its C-STORE names the same instance; anything else is
refused with a C-STORE failure status and never served, cached or learnt. A C-GET that brought
something else is an error naming what was asked and what came. Who may connect to the Storage SCP,
and how large an instance may be, is ``storescp.MoveListener``'s and ``pduguard.PduGuard``'s business.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pydicom
from pydicom.dataset import Dataset
from pynetdicom import _config
from pynetdicom.association import Association

from gateway.codec.attributes import INSTANCE, PATIENT, SERIES, STUDY
from gateway.codec.dicomfile import bulk_value, frame_of
from gateway.codec.dicomjson import dataset_json
from gateway.config import SourceConfig
from gateway.errors import (
    DicomFileError,
    GatewayError,
    NotFound,
    SourceError,
    SourceTimeout,
    SourceUnavailable,
)
from gateway.redact import escape
from gateway.stream.associations import QUERIES, STUDY_FIND, STUDY_GET, STUDY_MOVE, AssociationPool, refusal
from gateway.stream.pduguard import peer_name
from gateway.stream.source import CHUNK
from gateway.stream.storescp import MoveListener
from gateway.types import Entry, InstanceFile, Location, PixelInfo

__all__ = ["DimseSource"]

log = logging.getLogger("gateway.dimse")

# pynetdicom formats every identifier it sends or receives for its debug log, whatever the log
# level: a third of a C-FIND harvest's time. The gateway logs per request instead.
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_REQUEST_IDENTIFIERS = False

_PENDING = {0xFF00, 0xFF01}
# C-STORE statuses that refuse an instance. Not one we asked for (another instance, or ours carrying
# another study's or series' UIDs): "Refused: Not Authorized", a general status C-STORE may answer
# (PS3.7 9.1.1.1.9, C.5.21). A data set whose UIDs cannot be read: "Error: Cannot understand"
# (PS3.4 B.2.3, Table B.2-1).
_NOT_AUTHORIZED = 0x0124
_CANNOT_UNDERSTAND = 0xC000
_CACHE_BYTES = 128 * 1024 * 1024  # received instances kept for their other frames
# Return keys per level; OtherPatientIDsSequence carries the INS at many sites (an empty
# sequence asks for it, PS3.4 C.2.2.2.6); PACS that do not support it just leave it out.
# QueryRetrieveLevel, RetrieveAETitle, InstanceAvailability: about the query, not the instance.
_QUERY_ONLY = ("00080052", "00080054", "00080056")
_KEYS = {"study": PATIENT + STUDY + ("OtherPatientIDsSequence",), "series": SERIES, "image": INSTANCE}


class DimseSource:
    kind = "dimse"

    def __init__(self, config: SourceConfig) -> None:
        assert config.host is not None
        self.name = config.name
        self.config = config
        self.deadlines = config.deadlines
        self._associations = AssociationPool(config.name, config)
        self._lock = threading.Lock()
        self._threads: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._fetching: dict[str, asyncio.Future[bytes]] = {}
        self._moves: dict[str, _Retrieval] = {}  # C-MOVEs under way, by SOP Instance UID asked for
        self._scp: MoveListener | None = None  # the Storage SCP that receives C-MOVE sub-operations
        self.learn: Callable[[str, bytes], None] | None = None  # set by the gateway

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a DIMSE source harvests in its own process")

    # -- harvest: C-FIND (blocking, in a worker thread) ---------------------------------------------

    def scan(self, since: str | None = None) -> Iterator[Entry]:
        window = {"StudyDate": f"{since}-"} if since else {}  # a range match (PS3.4 C.2.2.2.5)
        with self._associations.acquire(QUERIES) as assoc:
            # Studies and series are listed in full before the next C-FIND on this association
            # (one operation at a time on it); instances are indexed as their responses arrive.
            for study in list(self._find(assoc, "STUDY", window, _KEYS["study"])):
                study_uid = str(study.StudyInstanceUID)
                query = {"StudyInstanceUID": study_uid}
                for series in list(self._find(assoc, "SERIES", query, _KEYS["series"])):
                    scope = {
                        "StudyInstanceUID": study_uid,
                        "SeriesInstanceUID": str(series.SeriesInstanceUID),
                    }
                    # The study's and series' attributes are converted once for all its instances.
                    common = _identifier_json(study) | _identifier_json(series)
                    for image in self._find(assoc, "IMAGE", scope, _KEYS["image"]):
                        yield self._entry(common, study, series, image)

    def read_header(self, entry: Entry) -> Any:
        raise SourceError(f"source {self.name}: entries come with their attributes")  # never called

    def _find(
        self, assoc: Association, level: str, match: dict[str, str], keys: tuple[str, ...]
    ) -> Iterator[Dataset]:
        """The identifiers of a C-FIND's pending responses, yielded as they arrive so that indexing
        them overlaps with receiving the next ones."""
        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword in keys:
            setattr(query, keyword, [] if keyword.endswith("Sequence") else "")
        for keyword, value in match.items():
            setattr(query, keyword, value)
        started = time.monotonic()
        deadline = started + self.deadlines.total
        for status, identifier in assoc.send_c_find(query, STUDY_FIND):
            self._check_deadline(assoc, deadline, f"C-FIND at {level} level")
            code = self._status(status, f"C-FIND at {level} level", started)
            if code in _PENDING and identifier is not None:
                yield identifier

    def _entry(self, common: dict[str, Any], study: Dataset, series: Dataset, image: Dataset) -> Entry:
        body = common | _identifier_json(image)
        raw = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        base = (
            f"/studies/{study.StudyInstanceUID}/series/{series.SeriesInstanceUID}"
            f"/instances/{image.SOPInstanceUID}"
        )
        # Many PACS do not return image attributes at IMAGE level (dcmqrscp does not): then the
        # frame count is unknown (-1) until the instance itself is retrieved.
        rows = image.get("Rows")
        frames = int(image.get("NumberOfFrames") or 1) if rows else (0 if "Rows" in image else -1)
        pixel = PixelInfo(None, "remote", False, "OW", -1, -1, {"remote": frames, "bulk": {}})
        if frames:
            body["7FE00010"] = {"vr": "OW", "BulkDataURI": f"{base}/bulk/7FE00010"}
        return Entry(base, len(raw), zlib.crc32(raw), prepared=(body, pixel))

    # -- retrieve: C-GET or C-MOVE ------------------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(8, thread_name_prefix=f"dimse-{self.name}")
        return self._threads

    async def aiter_instance(self, location: InstanceFile) -> AsyncIterator[bytes]:
        data = await self._instance(location.path, location.SOPInstanceUID, location.SOPClassUID)
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]

    async def aiter_frame(
        self, location: Location, index: int, meta: dict[str, int] | None = None
    ) -> AsyncIterator[bytes]:
        data = await self._instance(location.path, location.SOPInstanceUID, location.SOPClassUID)
        try:
            frame = await asyncio.get_running_loop().run_in_executor(self._pool(), frame_of, data, index)
        except GatewayError as exc:
            raise SourceError(f"source {self.name}: {exc.message}") from exc
        if meta is not None:
            meta["length"] = len(frame)
        yield frame

    async def aiter_bulk(self, location: Location, tag_path: str) -> AsyncIterator[bytes]:
        data = await self._instance(location.path, location.SOPInstanceUID, location.SOPClassUID)
        try:
            yield await asyncio.get_running_loop().run_in_executor(
                self._pool(), bulk_value, data, tag_path, location.SOPInstanceUID
            )
        except DicomFileError as exc:
            raise SourceError(f"source {self.name}: {exc.message}") from exc

    async def _instance(self, path: str, uid: str, sop_class: str | None) -> bytes:
        """One instance, from the cache, from a retrieval already under way (a viewer asks for
        several frames of an instance at once), or from a new retrieval."""
        cached = self._cache.get(uid)
        if cached is not None:
            self._cache.move_to_end(uid)
            return cached
        pending = self._fetching.get(uid)
        if pending is not None:
            return await asyncio.shield(pending)
        fetch = asyncio.ensure_future(self._fetch(path, uid, sop_class))
        self._fetching[uid] = fetch
        try:
            return await asyncio.shield(fetch)
        finally:
            if fetch.done():
                self._fetching.pop(uid, None)
            else:
                fetch.add_done_callback(lambda _: self._fetching.pop(uid, None))

    async def _fetch(self, path: str, uid: str, sop_class: str | None) -> bytes:
        received = [data async for _, data in self._retrieve(_uids(path), sop_class)]
        if not received:
            raise NotFound(f"source {self.name} sent nothing for instance {uid}")
        data = received[0]  # its UIDs are the ones asked for (``_received``)
        if self.learn is not None:
            # The first time an instance comes: its full header completes the index (metadata,
            # stored syntax, frame count), which C-FIND alone could not give.
            await asyncio.get_running_loop().run_in_executor(self._pool(), self.learn, path, data)
        self._remember(uid, data)
        return data

    def _remember(self, uid: str, data: bytes) -> None:
        previous = self._cache.pop(uid, None)
        if previous is not None:
            self._cached -= len(previous)
        self._cache[uid] = data
        self._cached += len(data)
        while self._cached > _CACHE_BYTES and len(self._cache) > 1:
            self._cached -= len(self._cache.popitem(last=False)[1])

    async def aiter_instances(self, locations: list[InstanceFile]) -> AsyncIterator[bytes]:
        """Several instances of one series with one C-GET (a UID list, PS3.4 C.4.3.2.1), each as
        Part 10 bytes in the order the PACS sends them: a series streams at the PACS's pace
        instead of one request per instance."""
        study, series, _ = _uids(locations[0].path)
        classes = {location.SOPClassUID for location in locations}
        sop_class = classes.pop() if len(classes) == 1 else None
        paths = {location.SOPInstanceUID: location.path for location in locations}
        uids = (study, series, [location.SOPInstanceUID for location in locations])
        log.info("source %s: %d instances of series %s in one retrieval", self.name, len(locations), series)
        async for uid, data in self._retrieve(uids, sop_class):
            if self.learn is not None:
                await asyncio.get_running_loop().run_in_executor(self._pool(), self.learn, paths[uid], data)
            yield data

    async def _retrieve(self, uids: _Uids, sop_class: str | None) -> AsyncIterator[tuple[str, bytes]]:
        """Instances of one C-GET (or C-MOVE) as they arrive: each one asked for, as its SOP
        Instance UID and Part 10 bytes."""
        loop = asyncio.get_running_loop()
        received: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue(2)

        def put(item: tuple[str, bytes] | None) -> None:  # worker thread: blocks while the client is slow
            asyncio.run_coroutine_threadsafe(received.put(item), loop).result(self.deadlines.total)

        operation = self._c_move if self.config.retrieve == "c-move" else self._c_get
        job = loop.run_in_executor(self._pool(), operation, _Retrieval(uids, put), sop_class)
        try:
            while True:
                waiter: asyncio.Future[Any] = asyncio.ensure_future(received.get())
                racing: set[asyncio.Future[Any]] = {waiter, job}
                done, _ = await asyncio.wait(
                    racing, timeout=self.deadlines.message, return_when=asyncio.FIRST_COMPLETED
                )
                if waiter in done:
                    item = waiter.result()
                    if item is None:
                        break
                    yield item
                    continue
                waiter.cancel()
                if job in done:
                    job.result()  # raises what the C-GET hit
                    break
                raise SourceTimeout(f"source {self.name}: no instance within {self.deadlines.message:g} s")
            await job
        finally:
            if not job.done():
                job.cancel()

    def _c_get(self, retrieval: _Retrieval, sop_class: str | None) -> None:
        with self._associations.acquire(sop_class) as assoc:

            def receive(event: Any) -> int:
                # Whatever is stored on this association during the C-GET is the PACS's answer to it.
                return self._received(event, lambda _: retrieval)

            assoc.gateway_sink["receive"] = receive  # type: ignore[attr-defined]
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = retrieval.uids
            deadline = time.monotonic() + self.deadlines.total
            final = None
            try:
                for status, _ in assoc.send_c_get(query, STUDY_GET):
                    self._check_deadline(assoc, deadline, "C-GET")
                    if self._status(status, "C-GET", deadline - self.deadlines.total) not in _PENDING:
                        final = status
            except GatewayError as exc:
                self._refused("C-GET", retrieval, refusal(assoc), exc)
                raise
            # The PACS sent something else than what was asked: that is the error, whatever the
            # final status says of the sub-operations we refused.
            self._refused("C-GET", retrieval, refusal(assoc))
            self._final(final, "C-GET")
        retrieval.put(None)

    def _c_move(self, retrieval: _Retrieval, sop_class: str | None) -> None:
        """C-MOVE to our own Storage SCP (for PACS without C-GET): the instances arrive on other
        associations, routed here by SOP Instance UID."""
        self._listener()
        with self._lock:
            for uid in retrieval.instances:
                self._moves[uid] = retrieval
        try:
            with self._associations.acquire(QUERIES) as assoc:
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = retrieval.uids
                deadline = time.monotonic() + self.deadlines.total
                final = None
                try:
                    for status, _ in assoc.send_c_move(query, self.config.calling_ae, STUDY_MOVE):
                        self._check_deadline(assoc, deadline, "C-MOVE")
                        if self._status(status, "C-MOVE", deadline - self.deadlines.total) not in _PENDING:
                            final = status
                    self._final(final, "C-MOVE")
                except SourceError as exc:
                    # Refusals alone do not fail a C-MOVE: anyone may have sent them, and the
                    # PACS's own copy may still come. When its sub-operations failed, they say why.
                    if type(exc) is SourceError:
                        self._refused("C-MOVE", retrieval, None, exc)
                    raise
        finally:
            with self._lock:
                for uid in retrieval.instances:
                    if self._moves.get(uid) is retrieval:
                        self._moves.pop(uid)
        retrieval.put(None)

    def _listener(self) -> MoveListener:
        with self._lock:
            if self._scp is None:
                listener = MoveListener(self.name, self.config, self._moved, self._awaited)
                listener.start()
                self._scp = listener
            return self._scp

    def _awaited(self, uid: str) -> bool:
        with self._lock:
            return uid in self._moves

    def _moved(self, event: Any) -> int:
        """A C-STORE on the Storage SCP: kept for the C-MOVE that asked for its instance, if any."""

        def lookup(uid: str) -> _Retrieval | None:
            with self._lock:
                return self._moves.get(uid)

        return self._received(event, lookup)

    def _received(self, event: Any, lookup: Callable[[str], _Retrieval | None]) -> int:
        """The status of a C-STORE that a retrieval brought (pynetdicom's thread): the instance
        goes to the retrieval (``lookup``, by SOP Instance UID) that asked for it, when its data
        set's own UIDs are the ones asked for; anything else is refused, named in the log with its
        sender, and noted on the retrieval it claimed to answer."""
        data = bytes(event.encoded_dataset(include_meta=True))
        command = str(event.request.AffectedSOPInstanceUID or "")
        own = _own_uids(data)
        sender = peer_name(event.assoc)
        retrieval = lookup(own[2] if own else command) or lookup(command)
        problem: str | None
        if own is None:
            problem = f"a C-STORE of {escape(command, 70)} whose data set's UIDs cannot be read"
            status = _CANNOT_UNDERSTAND
        else:
            problem, status = _mismatch(retrieval, command, own), _NOT_AUTHORIZED
            if retrieval is not None and problem is None:
                if retrieval.take(own[2]):
                    retrieval.put((own[2], data))
                    return 0x0000
                problem = f"instance {escape(own[2], 70)} came again"
        problem = problem or "not asked for"
        log.warning("source %s: refused an instance from %s: %s", self.name, sender, problem)
        if retrieval is not None and len(retrieval.refused) < 8:
            retrieval.refused.append(problem)
        return status

    def _refused(
        self, what: str, retrieval: _Retrieval, aborted: str | None, cause: Exception | None = None
    ) -> None:
        """Raise the error that says what the PACS sent instead of what was asked, if it did."""
        if aborted is not None:
            raise SourceError(f"source {self.name}: {what} aborted: the PACS sent {aborted}") from cause
        if retrieval.refused:
            raise SourceError(
                f"source {self.name}: {what} refused what came: {retrieval.refused[0]}"
            ) from cause

    def _final(self, status: Dataset | None, what: str) -> None:
        """Only full success is success: a warning or failure with failed sub-operations is not."""
        if status is None:
            raise SourceError(f"source {self.name}: {what} ended without a final status")
        code = int(status.Status)
        failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
        if code == 0x0000 and not failed:
            return
        done = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
        raise SourceError(
            f"source {self.name}: {what} ended with status {code:04X}: {failed} sub-operation(s) failed, "
            f"{done} completed"
        )

    def _status(self, status: Dataset, what: str, started: float | None = None) -> int:
        if not status or "Status" not in status:
            if started is not None and time.monotonic() - started < self.deadlines.message * 0.9:
                raise SourceUnavailable(
                    f"source {self.name}: {what} was cut short: the PACS aborted the association "
                    "(is this gateway's AE title known to it?)"
                )
            raise SourceTimeout(
                f"source {self.name}: {what} got no reply within {self.deadlines.message:g} s "
                "(or the association was aborted)"
            )
        code = int(status.Status)
        if code in _PENDING or code == 0x0000 or code & 0xF000 == 0xB000:
            return code
        raise SourceError(f"source {self.name}: {what} failed with status {code:04X}")

    def _check_deadline(self, assoc: Association, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            assoc.abort()
            raise SourceTimeout(f"source {self.name}: {what} took longer than {self.deadlines.total:g} s")

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
        if self._scp is not None:
            self._scp.close()
            self._scp = None
        if self._threads is not None:
            self._threads.shutdown(wait=False)


_Uids = tuple[str, str, "str | list[str]"]


def _identifier_json(identifier: Dataset) -> dict[str, Any]:
    """A C-FIND identifier's attributes as DICOM JSON, raw elements converted as they came (each
    identifier carries its own Specific Character Set, PS3.4 C.4.1.1.3.1)."""
    body = dataset_json(identifier, lambda path: path)
    for key in _QUERY_ONLY:
        body.pop(key, None)
    return body


class _Retrieval:
    """One C-GET or C-MOVE under way: what it asked for, where the instances it accepts go
    (``put``), and what was refused on its behalf."""

    def __init__(self, uids: _Uids, put: Callable[[tuple[str, bytes] | None], None]) -> None:
        self.uids = uids
        self.study, self.series = uids[0], uids[1]
        self.instances = tuple(uids[2]) if isinstance(uids[2], list) else (uids[2],)
        self.put = put
        self.refused: list[str] = []
        self._pending = set(self.instances)
        self._lock = threading.Lock()

    def take(self, uid: str) -> bool:
        """Whether ``uid`` is still awaited (then no longer): each instance is accepted once."""
        with self._lock:
            if uid not in self._pending:
                return False
            self._pending.discard(uid)
            return True

    def asked(self) -> str:
        which = (
            f"instance {self.instances[0]}"
            if len(self.instances) == 1
            else f"{len(self.instances)} instances"
        )
        return f"{which} of study {self.study}, series {self.series}"


def _mismatch(retrieval: _Retrieval | None, command: str, own: tuple[str, str, str]) -> str | None:
    """Why an instance is not one ``retrieval`` asked for (None when it is): its data set's own
    Study, Series and SOP Instance UIDs must be the ones asked for, and the C-STORE's Affected SOP
    Instance UID (PS3.7 9.1.1.1.4), which pynetdicom writes into the Part 10 header as Media
    Storage SOP Instance UID, must name that same instance."""
    study, series, sop = (escape(uid, 70) for uid in own)
    received = f"instance {sop} of study {study}, series {series}"
    if command != own[2]:
        received += f" in a C-STORE of instance {escape(command, 70)}"
    if retrieval is None:
        return f"{received}: not asked for"
    if (
        command != own[2]
        or own[2] not in retrieval.instances
        or own[:2] != (retrieval.study, retrieval.series)
    ):
        return f"asked for {retrieval.asked()}, received {received}"
    return None


def _own_uids(data: bytes) -> tuple[str, str, str] | None:
    """The Study, Series and SOP Instance UIDs of the data set itself (not its Part 10 header)."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        )
        return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    except Exception:  # malformed, hostile or missing UIDs: refused
        return None


def _uids(path: str) -> tuple[str, str, str]:
    parts = path.strip("/").split("/")  # studies/S/series/SE/instances/I
    return parts[1], parts[3], parts[5]
