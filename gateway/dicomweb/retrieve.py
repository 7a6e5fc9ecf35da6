"""WADO-RS retrieve transactions (PS3.18 10.4): instances, metadata, frames and bulk data.

Every response streams. Instances and frames come from the source by location (frames as byte
ranges recorded at harvest); metadata is the concatenation of DICOM JSON stored at harvest. The
representation is negotiated for every instance before the first byte is sent, so a response is
either complete or refused (406), and a source failing mid-stream aborts the transfer, which the
client sees against the announced Content-Length.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.dicomweb.accept import (
    BIG_ENDIAN,
    DEFLATED,
    EXPLICIT_LE,
    IMPLICIT_LE,
    Offer,
    compressed_media_type,
    negotiate,
    parse_accept,
)
from gateway.dicomweb.multipart import MultipartWriter
from gateway.errors import NotAcceptable, NotFound, RequestError, SourceError
from gateway.registry.record import BULK_KEY
from gateway.registry.store import InstanceFile, Location
from gateway.service import Gateway
from gateway.stream import framemap
from gateway.stream.transcode import to_explicit_little_endian

__all__ = ["retrieve_instances", "retrieve_metadata", "retrieve_frames", "retrieve_bulk"]

log = logging.getLogger("gateway.wado")
_METADATA_CHUNK = 256 * 1024
_MAX_FRAMES_PER_REQUEST = 10_000
_SMALL_RESPONSE = 4 * 1024 * 1024  # frame responses up to this size are sent from one buffer


def _where(scope: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    clauses, params = ["se.StudyInstanceUID = ?"], [scope["StudyInstanceUID"]]
    if "SeriesInstanceUID" in scope:
        clauses.append("i.SeriesInstanceUID = ?")
        params.append(scope["SeriesInstanceUID"])
    if "SOPInstanceUID" in scope:
        clauses.append("i.SOPInstanceUID = ?")
        params.append(scope["SOPInstanceUID"])
    return " AND ".join(clauses), tuple(params)


def _not_found(scope: dict[str, str]) -> NotFound:
    if "SOPInstanceUID" in scope:
        return NotFound(
            f"instance {scope['SOPInstanceUID']} not found in series "
            f"{scope['SeriesInstanceUID']} of study {scope['StudyInstanceUID']}"
        )
    if "SeriesInstanceUID" in scope:
        return NotFound(f"series {scope['SeriesInstanceUID']} not found in study {scope['StudyInstanceUID']}")
    return NotFound(f"study {scope['StudyInstanceUID']} not found")


async def _locations(gateway: Gateway, scope: dict[str, str]) -> list[Location]:
    if "SOPInstanceUID" in scope:
        # The per-frame path: a cached lookup on the event loop, no thread hop.
        one = gateway.registry.instance_location(
            scope["StudyInstanceUID"], scope["SeriesInstanceUID"], scope["SOPInstanceUID"]
        )
        found = [one] if one else []
    else:
        where, params = _where(scope)
        found = await anyio.to_thread.run_sync(gateway.registry.locations, where, params)
    if not found:
        raise _not_found(scope)
    return found


# -- metadata ----------------------------------------------------------------------------------


async def retrieve_metadata(
    request: Request, gateway: Gateway, scope: dict[str, str], base_url: str
) -> Response:
    _require_json(request)
    where, params = _where(scope)
    fragments = await anyio.to_thread.run_sync(gateway.registry.metadata, where, params)
    if not fragments:
        raise _not_found(scope)
    prefix = BULK_KEY + base_url.encode()

    async def body() -> AsyncIterator[bytes]:
        pending: list[bytes] = [b"["]
        size = 1
        for index, fragment in enumerate(fragments):
            if index:
                pending.append(b",")
            pending.append(fragment.replace(BULK_KEY, prefix))
            size += len(fragment)
            if size >= _METADATA_CHUNK:
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


# -- instances -----------------------------------------------------------------------------------

_NOT_FOR_WEB = {IMPLICIT_LE, BIG_ENDIAN}  # PS3.18 8.7.3.3.1


def _instance_offers(location: InstanceFile) -> list[Offer]:
    stored = location.TransferSyntaxUID or IMPLICIT_LE
    offers = [] if stored in _NOT_FOR_WEB else [Offer("application/dicom", stored)]
    if stored in _NOT_FOR_WEB or stored == DEFLATED:
        offers.append(Offer("application/dicom", EXPLICIT_LE))
    return offers


async def retrieve_instances(
    request: Request, gateway: Gateway, scope: dict[str, str], base_url: str
) -> Response:
    where, params = _where(scope)
    locations = await anyio.to_thread.run_sync(gateway.registry.instance_files, where, params)
    if not locations:
        raise _not_found(scope)
    ranges = parse_accept(request.headers.get("accept"))
    plan = [(loc, negotiate(ranges, _instance_offers(loc), "application/dicom")) for loc in locations]
    writer = MultipartWriter("application/dicom")
    sizes_known = all(offer.transfer_syntax == (loc.TransferSyntaxUID or IMPLICIT_LE) for loc, offer in plan)
    headers: dict[str, str] = {}
    if sizes_known:
        total = writer.total_length(
            (writer.part_header(loc.size, offer.transfer_syntax), loc.size) for loc, offer in plan
        )
        headers["Content-Length"] = str(total)

    async def body() -> AsyncIterator[bytes]:
        for loc, offer in plan:
            source = gateway.source(loc.source)
            if offer.transfer_syntax == (loc.TransferSyntaxUID or IMPLICIT_LE):
                async for chunk in _part(
                    writer.part_header(loc.size, offer.transfer_syntax), source.aiter_instance(loc), writer
                ):
                    yield chunk
            else:
                stored = b"".join([chunk async for chunk in source.aiter_instance(loc)])
                data = await anyio.to_thread.run_sync(to_explicit_little_endian, stored, loc.path)
                yield writer.part_header(len(data), offer.transfer_syntax) + data + writer.part_end
        yield writer.closing()

    return await _stream(body(), request, writer.content_type, headers)


# -- frames --------------------------------------------------------------------------------------


def _frame_offers(location: Location) -> list[Offer]:
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
    numbers = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise RequestError(f"frame list: {item!r} is not a frame number (frames count from 1)")
        numbers.append(int(item))
    if len(numbers) > _MAX_FRAMES_PER_REQUEST:
        raise RequestError(f"frame list: more than {_MAX_FRAMES_PER_REQUEST} frames in one request")
    missing = [n for n in numbers if n > count]
    if missing:
        raise NotFound(f"frame {missing[0]} does not exist: the instance has {count} frame(s)")
    return numbers


def _pixel_location(location: Location) -> dict[str, Any]:
    if location.frames is None:
        if location.frame_error:
            raise SourceError(
                f"frames of instance {location.SOPInstanceUID} cannot be located in "
                f"source {location.source}: {location.frame_error}"
            )
        raise NotFound(f"instance {location.SOPInstanceUID} has no pixel data")
    return location.frames


async def retrieve_frames(
    request: Request, gateway: Gateway, scope: dict[str, str], frame_list: str
) -> Response:
    (location,) = await _locations(gateway, scope)
    frames = _pixel_location(location)
    numbers = parse_frame_numbers(frame_list, framemap.frame_count(frames))
    offer = negotiate(
        parse_accept(request.headers.get("accept")), _frame_offers(location), "application/octet-stream"
    )
    writer = MultipartWriter(offer.part_type)
    parts = [
        (
            writer.part_header(framemap.frame_size(frames, n - 1), offer.transfer_syntax),
            framemap.frame_size(frames, n - 1),
            n,
        )
        for n in numbers
    ]
    total = writer.total_length((header, size) for header, size, _ in parts)
    source = gateway.source(location.source)
    if total <= _SMALL_RESPONSE:
        # The viewer's common case, one frame per request: one buffer and one plain response
        # (two socket writes instead of five, no streaming machinery), still bounded in size.
        pieces = []
        for header, _, number in parts:
            pieces.append(header)
            pieces.extend([chunk async for chunk in source.aiter_frame(location, number - 1)])
            pieces.append(writer.part_end)
        pieces.append(writer.closing())
        return Response(b"".join(pieces), media_type=writer.content_type)

    async def body() -> AsyncIterator[bytes]:
        for header, _, number in parts:
            async for chunk in _part(header, source.aiter_frame(location, number - 1), writer):
                yield chunk
        yield writer.closing()

    return await _stream(body(), request, writer.content_type, {"Content-Length": str(total)})


# -- bulk data -----------------------------------------------------------------------------------


async def retrieve_bulk(request: Request, gateway: Gateway, scope: dict[str, str], tag_path: str) -> Response:
    (location,) = await _locations(gateway, scope)
    if tag_path.upper() == "7FE00010":
        frames = _pixel_location(location)
        count = framemap.frame_count(frames)
        return await retrieve_frames(request, gateway, scope, ",".join(str(n) for n in range(1, count + 1)))
    source = gateway.source(location.source)
    stored = b"".join([chunk async for chunk in source.aiter_instance(location.file())])
    value = await anyio.to_thread.run_sync(_bulk_value, stored, tag_path, location.SOPInstanceUID)
    negotiate(
        parse_accept(request.headers.get("accept")),
        [Offer("application/octet-stream", EXPLICIT_LE)],
        "application/octet-stream",
    )
    writer = MultipartWriter("application/octet-stream")
    payload = writer.part_header(len(value)) + value + writer.part_end + writer.closing()
    return Response(payload, media_type=writer.content_type)


def _bulk_value(stored: bytes, tag_path: str, uid: str) -> bytes:
    import io

    import pydicom

    missing = NotFound(f"instance {uid} has no bulk data at {tag_path}")
    parts = tag_path.split("/")
    if len(parts) % 2 != 1:
        raise RequestError(f"bulk data path {tag_path!r} is malformed (TAG[/index/TAG]...)")
    try:
        ds: Any = pydicom.dcmread(io.BytesIO(stored), stop_before_pixels=True)
        for position, part in enumerate(parts):
            if position % 2:
                ds = ds[int(part)]
            else:
                element = ds[int(part, 16)]
                ds = element.value
    except (KeyError, IndexError, TypeError):
        raise missing from None
    except ValueError:
        raise RequestError(f"bulk data path {tag_path!r} is malformed (TAG[/index/TAG]...)") from None
    if not isinstance(ds, bytes):
        raise missing
    return ds


# -- streaming ------------------------------------------------------------------------------------


async def _part(header: bytes, data: AsyncIterator[bytes], writer: MultipartWriter) -> AsyncIterator[bytes]:
    """One multipart part whose header is yielded only once the source delivered its first chunk,
    so that a source failing on the first part fails the request before any byte is sent."""
    first = await anext(data, b"")
    yield header
    yield first  # not header + first: that would copy the frame
    async for chunk in data:
        yield chunk
    yield writer.part_end


async def _stream(
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
