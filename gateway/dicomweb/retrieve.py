"""WADO-RS retrieve transactions (PS3.18 10.4): instances, frames and bulk data.

Every response streams from the sources, through the federation: each instance is read from the
first of its locations that delivers, failing over before the first byte. The representation is
negotiated for every instance before anything is sent, so a response is complete or refused (406);
a source failing mid-stream aborts the transfer. The one exception: an instance whose source has not
said its syntax (a DIMSE PACS before its first retrieval) asked for as Explicit VR Little Endian is
checked when it comes, and a compressed one met after the first aborts the transfer too. Local frames
have known sizes, so their responses carry a Content-Length; remote ones are sent chunked.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import pydicom
from starlette.requests import Request
from starlette.responses import Response

from gateway.codec import framemap
from gateway.codec.multipart import MultipartWriter
from gateway.codec.transcode import to_explicit_little_endian
from gateway.dicomweb.accept import (
    BIG_ENDIAN,
    DEFLATED,
    EXPLICIT_LE,
    IMPLICIT_LE,
    UNKNOWN,
    MediaRange,
    Offer,
    compressed_media_type,
    negotiate,
    parse_accept,
)
from gateway.dicomweb.scope import not_found
from gateway.dicomweb.streaming import SizedStream, sized_stream, stream
from gateway.errors import NotAcceptable, NotFound, RequestError, SourceError
from gateway.registry.store import Registry
from gateway.stream.federation import Federation
from gateway.stream.source import BatchRetrieval
from gateway.types import InstanceFile, Location

__all__ = ["retrieve_instances", "retrieve_frames", "retrieve_bulk", "parse_frame_numbers"]

_MAX_FRAMES_PER_REQUEST = 10_000  # when the instance's own count is unknown (a remote source)
_MAX_FRAME_NUMBER = 2**31 - 1  # NumberOfFrames is an IS (PS3.5 6.2)
_FRAME_NUMBER = re.compile(r"[0-9]{1,10}")
# A BulkDataURI's path, as the index writes them (gateway.codec.dicomjson): a tag, or a sequence's
# tag, an item index and a tag, and so on, at most as deep as the index reads sequences.
_MAX_BULK_DEPTH = 32
_BULK_PATH = re.compile(r"[0-9A-Fa-f]{8}(/[0-9]{1,9}/[0-9A-Fa-f]{8}){0," + str(_MAX_BULK_DEPTH) + "}")
_SMALL_RESPONSE = 4 * 1024 * 1024  # frame responses up to this size are sent from one buffer
_NOT_FOR_WEB = {IMPLICIT_LE, BIG_ENDIAN}  # PS3.18 8.7.3.3.1


def _note_source(request: Request, source: str) -> None:
    """The source that delivered, for the request's audit record (several: comma-separated)."""
    noted = request.scope.setdefault("state", {}).setdefault("audit", {})
    known = noted.get("source")
    if known is None:
        noted["source"] = source
    elif source not in known.split(","):
        noted["source"] = f"{known},{source}"


def _alternatives(registry: Registry, scope: dict[str, str]) -> list[Location]:
    # The per-frame path: a cached lookup on the event loop, no thread hop.
    found = registry.instance_location(
        scope["StudyInstanceUID"], scope["SeriesInstanceUID"], scope["SOPInstanceUID"]
    )
    if not found:
        raise not_found(scope)
    return found


def _choices(ranges: list[MediaRange], alternatives: list[Any], offers: Any, default: str) -> list[Any]:
    """(location, offer) for each location that can be sent as asked, best location first."""
    choices, refusal = [], None
    for alternative in alternatives:
        try:
            choices.append((alternative, negotiate(ranges, offers(alternative), default)))
        except NotAcceptable as exc:
            refusal = exc
    if not choices:
        assert refusal is not None
        raise refusal
    return choices


def _offer_of(choices: list[tuple[Any, Offer]], chosen: Any) -> Offer:
    return next(offer for alternative, offer in choices if alternative is chosen)


# -- instances -----------------------------------------------------------------------------------


def _instance_offers(location: InstanceFile) -> list[Offer]:
    if _unknown(location):
        # An upstream that does not say (a DIMSE PACS before its first retrieval): as it comes, or
        # as Explicit VR Little Endian, which a request naming no syntax means (PS3.18 Table
        # 8.7.3-5: dicomweb-client's plain Accept) and which is checked once the instance is here
        # (``_as_explicit_little_endian``).
        return [Offer("application/dicom", UNKNOWN), Offer("application/dicom", EXPLICIT_LE)]
    stored = location.TransferSyntaxUID or IMPLICIT_LE
    offers = [] if stored in _NOT_FOR_WEB else [Offer("application/dicom", stored)]
    if stored in _NOT_FOR_WEB or stored == DEFLATED:
        offers.append(Offer("application/dicom", EXPLICIT_LE))
    return offers


async def retrieve_instances(
    request: Request, registry: Registry, federation: Federation, scope: dict[str, str], base_url: str
) -> Response:
    instances = await anyio.to_thread.run_sync(registry.instance_files, scope)
    if not instances:
        raise not_found(scope)
    ranges = parse_accept(request.headers.get("accept"))
    plan = [
        _choices(ranges, alternatives, _instance_offers, "application/dicom") for alternatives in instances
    ]
    writer = MultipartWriter("application/dicom")
    headers: dict[str, str] = {}
    if all(len(choices) == 1 and _as_stored(*choices[0]) and not choices[0][0].remote for choices in plan):
        # One known file per instance, sent as stored: the length is known before the first byte.
        sizes = [(choices[0][0].size, choices[0][1].transfer_syntax) for choices in plan]
        total = writer.total_length((writer.part_header(size, syntax), size) for size, syntax in sizes)
        headers["Content-Length"] = str(total)

    async def body() -> AsyncIterator[bytes]:
        index = 0
        while index < len(plan):
            batch = _batch(federation, plan, index)
            if batch:  # a run of one series from a source that sends many instances at once
                retrieval, files, syntax = batch
                _note_source(request, files[0].source)
                received = 0
                # Closed as soon as this body stops (the client hung up): the PACS is told to stop.
                async with contextlib.aclosing(retrieval.aiter_instances(files)) as instances:
                    async for data in instances:
                        received += 1
                        if syntax == EXPLICIT_LE and _unknown(files[0]):
                            data = await _as_explicit_little_endian(data, files[0])
                        yield writer.part_header(len(data), syntax)
                        yield data
                        yield writer.part_end
                if received != len(files):
                    raise SourceError(f"source {files[0].source} sent {received} of {len(files)} instances")
                index += len(files)
                continue
            choices = plan[index]
            index += 1
            located, first, rest = await federation.open(
                [alternative for alternative, _ in choices], lambda source, a: source.aiter_instance(a)
            )
            _note_source(request, located.source)
            offer = _offer_of(choices, located)
            if _as_stored(located, offer):
                yield writer.part_header(None if located.remote else located.size, offer.transfer_syntax)
                yield first
                async for chunk in rest:
                    yield chunk
                yield writer.part_end
            else:
                stored = first + b"".join([chunk async for chunk in rest])
                if _unknown(located):
                    data = await _as_explicit_little_endian(stored, located)
                else:
                    data = await anyio.to_thread.run_sync(to_explicit_little_endian, stored, located.path)
                yield writer.part_header(len(data), offer.transfer_syntax) + data + writer.part_end
        yield writer.closing()

    return await stream(body(), request, writer.content_type, headers)


_BATCH = 1000  # instances asked for in one request to a source that can send many


def _batch(
    federation: Federation, plan: list[Any], start: int
) -> tuple[BatchRetrieval, list[InstanceFile], str] | None:
    """The run of instances from ``start`` that one remote source can send in one retrieval
    (its ``batch``): the same preferred source, the same series, sent as stored (or, their syntax
    unknown, as Explicit VR Little Endian: ``_as_explicit_little_endian``); with the syntax of its
    parts. None when there is no such run."""
    first, offer = plan[start][0]
    source = federation.sources.get(first.source)
    batch = source.batch if source is not None else None
    if not first.remote or batch is None or not _in_batch(first, offer):
        return None
    if federation.order([c[0] for c in plan[start]])[0] is not first:
        return None  # the preferred source is down: per instance, with failover
    series = first.path.split("/instances/")[0]
    files = []
    for choices in plan[start : start + _BATCH]:
        location, other = choices[0]
        if location.source != first.source or location.path.split("/instances/")[0] != series:
            break
        if other != offer or location.TransferSyntaxUID != first.TransferSyntaxUID:
            break
        files.append(location)
    syntax = offer.transfer_syntax if _unknown(first) else first.TransferSyntaxUID or UNKNOWN
    return (batch, files, syntax) if len(files) > 1 else None


def _in_batch(location: InstanceFile, offer: Offer) -> bool:
    return _as_stored(location, offer) or (_unknown(location) and offer.transfer_syntax == EXPLICIT_LE)


def _unknown(location: InstanceFile | Location) -> bool:
    """Whether the instance's syntax is unknown until it comes (a remote source that did not say)."""
    return location.TransferSyntaxUID is None and location.mode == "remote"


_UNCOMPRESSED = {EXPLICIT_LE, IMPLICIT_LE, BIG_ENDIAN, DEFLATED}


async def _as_explicit_little_endian(data: bytes, location: InstanceFile) -> bytes:
    """An instance whose syntax was unknown until it came, asked for as Explicit VR Little Endian:
    passed on when it came so, re-encoded from another uncompressed syntax (PS3.18 8.7.3.3.1),
    refused when compressed (no transcoding yet): a 406 when it is the response's first
    instance; later ones abort the response, whose earlier parts are sent (each instance's
    syntax is known only once it is here; the next request is negotiated before the first byte,
    with the syntaxes learnt)."""
    syntax = await anyio.to_thread.run_sync(_syntax_of, data, location)
    if syntax == EXPLICIT_LE:
        return data
    if syntax not in _UNCOMPRESSED:
        raise NotAcceptable(
            f"instance {location.SOPInstanceUID} came from source {location.source} in transfer syntax "
            f"{syntax}, which cannot be sent as Explicit VR Little Endian without transcoding, which "
            f"this gateway does not do yet: ask for transfer-syntax=* or transfer-syntax={syntax}"
        )
    return await anyio.to_thread.run_sync(to_explicit_little_endian, data, location.path)


def _syntax_of(data: bytes, location: InstanceFile) -> str:
    """The transfer syntax of a Part 10 instance, from its file meta (PS3.10 7.1)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:  # pydicom raises many types on malformed data
        raise SourceError(
            f"source {location.source} sent instance {location.SOPInstanceUID} without a readable "
            f"transfer syntax ({type(exc).__name__})"
        ) from exc


def _as_stored(location: InstanceFile, offer: Offer) -> bool:
    return offer.transfer_syntax in (UNKNOWN, location.TransferSyntaxUID or IMPLICIT_LE)


# -- frames --------------------------------------------------------------------------------------


def _frame_offers(location: Location) -> list[Offer]:
    _pixel_location(location)
    if location.TransferSyntaxUID is None and location.mode == "remote":
        return [Offer("application/octet-stream", UNKNOWN)]  # an upstream that does not say
    stored = location.TransferSyntaxUID or IMPLICIT_LE
    if not location.encapsulated:
        return [Offer("application/octet-stream", EXPLICIT_LE)]  # native bytes, little endian
    offers = []
    media = compressed_media_type(stored)
    if media:
        offers.append(Offer(media, stored))
    offers.append(Offer("application/octet-stream", stored))
    return offers


def parse_frame_numbers(text: str, count: int) -> list[int]:
    """The frame numbers of a frame list for an instance of ``count`` frames (-1: not known).

    PS3.18 10.4.1 (the frames resource; worded in PS3.18 2017b 6.5.4): "a comma or %2C separated
    list of one or more non duplicate frame numbers", in any order. A list without duplicates that
    is longer than the instance names a frame it does not have (404); a list is never split past
    the instance's frame count or, when it is not known, ``_MAX_FRAMES_PER_REQUEST``."""
    bound = max(count, _MAX_FRAMES_PER_REQUEST)
    items = text.split(",", bound)  # one more item than the bound: the rest of a longer list
    if len(items) > bound:
        raise RequestError(f"frame list: at most {bound} frames in one request for this instance")
    numbers: list[int] = []
    seen: set[int] = set()
    for item in items:
        item = item.strip()
        if not _FRAME_NUMBER.fullmatch(item) or not 1 <= int(item) <= _MAX_FRAME_NUMBER:
            raise RequestError(
                f"frame list: {_shown(item)} is not a frame number (frames count from 1, "
                f"up to {_MAX_FRAME_NUMBER})"
            )
        number = int(item)
        if number in seen:
            raise RequestError(
                f"frame list: frame {number} is asked for twice (PS3.18 10.4.1: a list of "
                "non-duplicate frame numbers)"
            )
        seen.add(number)
        numbers.append(number)
    missing = [n for n in numbers if n > count >= 0]
    if missing:
        raise NotFound(f"frame {missing[0]} does not exist: the instance has {count} frame(s)")
    return numbers


def _shown(text: str) -> str:
    """Request text for a message, cut when long."""
    return repr(text) if len(text) <= 32 else f"{text[:32]!r}... ({len(text)} characters)"


def _pixel_location(location: Location) -> dict[str, Any]:
    if location.frames is None or not framemap.frame_count(location.frames):
        if location.frame_error:
            raise SourceError(
                f"frames of instance {location.SOPInstanceUID} cannot be located in "
                f"source {location.source}: {location.frame_error}"
            )
        raise NotFound(f"instance {location.SOPInstanceUID} has no pixel data")
    return location.frames


async def retrieve_frames(
    request: Request,
    registry: Registry,
    federation: Federation,
    scope: dict[str, str],
    frame_list: str | None,
) -> Response | SizedStream:
    """``frame_list``: the request's (None: every frame, for the pixel data's BulkDataURI)."""
    alternatives = _alternatives(registry, scope)
    _pixel_location(alternatives[0])  # 404 for an instance without pixels, before any Accept error
    ranges = parse_accept(request.headers.get("accept"))
    choices = _choices(ranges, alternatives, _frame_offers, "application/octet-stream")
    count = framemap.frame_count(_pixel_location(choices[0][0]))
    # An unknown count (a PACS that does not say at harvest): the source refuses missing frames.
    if frame_list is not None:
        numbers = parse_frame_numbers(frame_list, count)
    elif count >= 0:
        numbers = list(range(1, count + 1))
    else:
        raise RequestError(
            f"instance {scope['SOPInstanceUID']}: its source did not say how many frames it holds; "
            "ask for them by number (/frames/1,2,...)"
        )
    asked = numbers[0] - 1
    located, opened = await federation.first(
        [location for location, _ in choices], lambda source, location: source.open_frame(location, asked)
    )
    _note_source(request, located.source)
    offer = _offer_of(choices, located)
    source = federation.sources[located.source]
    writer = MultipartWriter(offer.part_type)
    sizes = [framemap.frame_size(_pixel_location(located), n - 1) for n in numbers]
    if sizes == [None] and opened.length is not None:
        # One remote frame whose upstream said its length: a Content-Length, no chunked encoding
        # (uvicorn copies every chunk to frame it), and no streaming machinery (one frame).
        length = opened.length
        total = writer.total_length([(writer.part_header(length, offer.transfer_syntax), length)])
        body = _frames_body(writer, offer, [length], lambda _: opened.aiter_bytes())
        return await sized_stream(body, request, writer.content_type, total)

    async def frame(index: int) -> AsyncIterator[bytes]:
        if index == 0:
            yield opened.first
            if opened.rest is not None:
                async for chunk in opened.rest:
                    yield chunk
        else:
            later = await source.open_frame(located, numbers[index] - 1)
            async for chunk in later.aiter_bytes():
                yield chunk

    if None in sizes:  # a remote source: lengths are unknown; passing bytes on as they come keeps
        # the upstream transfer and ours overlapping (gathering them first measured slower)
        return await stream(_frames_body(writer, offer, sizes, frame), request, writer.content_type, {})
    total = writer.total_length(
        (writer.part_header(size, offer.transfer_syntax), size or 0) for size in sizes
    )
    if total <= _SMALL_RESPONSE:
        # The viewer's common case, one frame per request: one buffer and one plain response
        # (two socket writes instead of five, no streaming machinery), still bounded in size.
        pieces = [chunk async for chunk in _frames_body(writer, offer, sizes, frame)]
        return Response(b"".join(pieces), media_type=writer.content_type)
    body = _frames_body(writer, offer, sizes, frame)
    return await stream(body, request, writer.content_type, {"Content-Length": str(total)})


async def _frames_body(
    writer: MultipartWriter, offer: Offer, sizes: list[int | None], frame: Any
) -> AsyncIterator[bytes]:
    for index, size in enumerate(sizes):
        yield writer.part_header(size, offer.transfer_syntax)
        async for chunk in frame(index):
            yield chunk
        yield writer.part_end
    yield writer.closing()


# -- bulk data -----------------------------------------------------------------------------------


async def retrieve_bulk(
    request: Request, registry: Registry, federation: Federation, scope: dict[str, str], tag_path: str
) -> Response | SizedStream:
    alternatives = _alternatives(registry, scope)
    if tag_path.upper() == "7FE00010":
        return await retrieve_frames(request, registry, federation, scope, None)
    if not _BULK_PATH.fullmatch(tag_path):
        raise RequestError(
            f"bulk data path {_shown(tag_path)} is malformed: expected TAG[/index/TAG]... (tags of "
            f"8 hex digits, at most {_MAX_BULK_DEPTH} sequences deep)"
        )
    negotiate(
        parse_accept(request.headers.get("accept")),
        [Offer("application/octet-stream", EXPLICIT_LE)],
        "application/octet-stream",
    )
    located, first, rest = await federation.open(
        alternatives, lambda source, location: source.aiter_bulk(location, tag_path)
    )
    _note_source(request, located.source)
    writer = MultipartWriter("application/octet-stream")

    async def body() -> AsyncIterator[bytes]:
        yield writer.part_header(None)
        yield first
        async for chunk in rest:
            yield chunk
        yield writer.part_end + writer.closing()

    return await stream(body(), request, writer.content_type, {})
