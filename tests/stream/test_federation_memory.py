"""Federation over in-memory sources: which location serves, when it may change, and how failures
and deadlines are answered, in milliseconds and without a peer (tests/stream/test_federation.py
proves the same over real ones)."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from gateway.errors import GatewayError, NotFound, SourceError, SourceTimeout, SourceUnavailable
from gateway.stream import federation as federation_module
from gateway.stream.federation import Federation
from gateway.stream.memory import MemorySource
from gateway.stream.source import Frame, Source
from gateway.types import Location

T = TypeVar("T")
UID = "1.2.826.0.1.3680043.10.511.3.1"
ROWS = COLUMNS = 8
FRAMES = 3
FRAME_BYTES = ROWS * COLUMNS


def instance(uid: str = UID) -> Dataset:
    """A small native multi-frame instance whose frames differ byte for byte."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.511.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.511.2"
    ds.PatientID = "MEM-1"
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLUMNS, FRAMES
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(index % 251 for index in range(FRAME_BYTES * FRAMES))
    return ds


def frame_bytes(index: int) -> bytes:
    return bytes(i % 251 for i in range(index * FRAME_BYTES, (index + 1) * FRAME_BYTES))


def federate(*sources: MemorySource) -> Federation:
    """Sources in priority order: the first is preferred."""
    held: dict[str, Source] = {source.name: source for source in sources}
    return Federation(held, {source.name: rank for rank, source in enumerate(sources)})


def locations(*sources: MemorySource, uid: str = UID) -> list[Location]:
    return [source.location(uid) for source in sources]


def run(work: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(work)


async def read(frame: Frame) -> bytes:
    return b"".join([chunk async for chunk in frame.aiter_bytes()])


def open_frame(federation: Federation, alternatives: list[Location], index: int = 0) -> tuple[str, bytes]:
    """(the source that served frame ``index``, its bytes)."""

    async def work() -> tuple[str, bytes]:
        located, frame = await federation.first(
            alternatives, lambda source, location: source.open_frame(location, index)
        )
        return located.source, await read(frame)

    return run(work)


def frames_asked(source: MemorySource) -> int:
    return sum(1 for asked in source.asked if asked[0] == "frame")


def test_a_frame_comes_from_the_preferred_location_with_its_length():
    a, b = MemorySource("a", [instance()]), MemorySource("b", [instance()])

    async def work() -> tuple[Location, Frame]:
        return await federate(a, b).first(locations(a, b), lambda source, loc: source.open_frame(loc, 1))

    located, frame = run(work)
    assert located.source == "a" and frame.length == FRAME_BYTES
    assert run(lambda: read(frame)) == frame_bytes(1)
    assert frames_asked(b) == 0


def test_a_location_failing_before_its_first_byte_falls_over_to_the_next():
    a = MemorySource("a", [instance()], error=SourceError("source a: disk on fire"))
    b = MemorySource("b", [instance()])
    assert open_frame(federate(a, b), locations(a, b), 2) == ("b", frame_bytes(2))
    assert frames_asked(a) == 1


def test_locations_are_tried_in_priority_order_whatever_order_they_are_listed_in():
    a, b, c = (MemorySource(name, [instance()]) for name in "abc")
    federation = Federation({"a": a, "b": b, "c": c}, {"a": 2, "b": 0, "c": 1})
    assert open_frame(federation, locations(a, c, b))[0] == "b"
    assert federation.order(locations(a, b, c)) == locations(b, c, a)


def test_an_unreachable_source_is_tried_last_while_it_is_down():
    a = MemorySource("a", [instance()], error=SourceUnavailable("source a is unreachable"))
    b = MemorySource("b", [instance()])
    federation = federate(a, b)
    assert open_frame(federation, locations(a, b))[0] == "b"
    a.error = None  # back, but the federation does not know yet
    assert open_frame(federation, locations(a, b))[0] == "b"
    assert frames_asked(a) == 1  # not asked again while it is down


def test_a_source_down_is_tried_first_again_once_its_time_is_over(monkeypatch):
    monkeypatch.setattr(federation_module, "_DOWN_FOR", 0.0)
    a = MemorySource("a", [instance()], error=SourceUnavailable("source a is unreachable"))
    b = MemorySource("b", [instance()])
    federation = federate(a, b)
    assert open_frame(federation, locations(a, b))[0] == "b"
    a.error = None
    assert open_frame(federation, locations(a, b))[0] == "a"


def test_a_source_that_delivers_is_no_longer_down():
    a = MemorySource("a", [instance()], error=SourceUnavailable("source a is unreachable"))
    b = MemorySource("b", [instance()])
    federation = federate(a, b)
    open_frame(federation, locations(a, b))
    a.error = None
    assert open_frame(federation, locations(a))[0] == "a"  # its only location: tried, and it works
    assert open_frame(federation, locations(a, b))[0] == "a"


def test_an_error_other_than_unreachable_does_not_put_a_source_last():
    a = MemorySource("a", [instance()], error=SourceError("source a: answered 500"))
    b = MemorySource("b", [instance()])
    federation = federate(a, b)
    open_frame(federation, locations(a, b))
    a.error = None
    assert open_frame(federation, locations(a, b))[0] == "a"


def test_a_hung_source_ends_in_a_timeout_at_its_deadline():
    a = MemorySource("a", [instance()], delay=math.inf, deadline=0.05)
    started = time.monotonic()
    with pytest.raises(SourceTimeout) as caught:
        open_frame(federate(a), locations(a))
    assert time.monotonic() - started < 5
    assert caught.value.status == 504


def test_a_hung_source_falls_over_to_the_next_and_is_then_tried_last():
    a = MemorySource("a", [instance()], delay=math.inf, deadline=0.05)
    b = MemorySource("b", [instance()])
    federation = federate(a, b)
    assert open_frame(federation, locations(a, b)) == ("b", frame_bytes(0))
    started = time.monotonic()
    assert open_frame(federation, locations(a, b))[0] == "b"
    assert time.monotonic() - started < 0.05  # no second wait for the hung source
    assert frames_asked(a) == 1


def test_a_slow_source_within_its_deadline_still_serves():
    a = MemorySource("a", [instance()], delay=0.01, deadline=5)
    b = MemorySource("b", [instance()])
    assert open_frame(federate(a, b), locations(a, b)) == ("a", frame_bytes(0))


def test_a_source_failing_mid_stream_is_not_swapped_after_bytes_were_sent():
    a = MemorySource("a", [instance()], chunk=16, error=SourceError("source a: cut off"), error_after=1)
    b = MemorySource("b", [instance()])

    async def work() -> tuple[str, bytes, list[bytes]]:
        located, frame = await federate(a, b).first(
            locations(a, b), lambda source, location: source.open_frame(location, 0)
        )
        assert frame.rest is not None
        rest = []
        with pytest.raises(SourceError, match="cut off"):
            async for chunk in frame.rest:
                rest.append(chunk)
        return located.source, frame.first, rest

    source, first, rest = run(work)
    assert source == "a" and first == frame_bytes(0)[:16] and rest == []
    assert frames_asked(b) == 0


def test_an_instance_stream_falls_over_before_its_first_byte():
    a = MemorySource("a", [instance()], error=SourceUnavailable("source a is unreachable"))
    b = MemorySource("b", [instance()], chunk=100)

    async def work() -> tuple[str, bytes]:
        located, first, rest = await federate(a, b).open(
            [a.instance_file(UID), b.instance_file(UID)], lambda source, file: source.aiter_instance(file)
        )
        return located.source, first + b"".join([chunk async for chunk in rest])

    source, data = run(work)
    assert source == "b" and len(data) == b.instance_file(UID).size
    assert pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == UID


def test_every_location_not_holding_it_is_a_not_found():
    a, b = MemorySource("a", [instance()]), MemorySource("b", [instance()])
    alternatives = locations(a, b)
    a.remove(UID)
    b.remove(UID)
    with pytest.raises(NotFound, match="no location could deliver it"):
        open_frame(federate(a, b), alternatives)


def test_the_worst_failure_among_the_locations_is_the_answer():
    a = MemorySource("a", [instance()])
    b = MemorySource("b", [instance()], error=SourceUnavailable("source b is unreachable"))
    alternatives = locations(a, b)
    a.remove(UID)
    with pytest.raises(SourceUnavailable) as caught:
        open_frame(federate(a, b), alternatives)
    assert (
        "source a does not hold" in caught.value.message and "source b is unreachable" in caught.value.message
    )


def test_a_location_of_a_source_no_longer_configured_is_skipped():
    a, b = MemorySource("a", [instance()]), MemorySource("b", [instance()])
    assert open_frame(federate(b), locations(a, b))[0] == "b"


def test_one_location_failing_answers_its_own_error():
    a = MemorySource("a", [instance()], error=SourceError("source a: answered 500"))
    with pytest.raises(GatewayError, match="answered 500") as caught:
        open_frame(federate(a), locations(a))
    assert type(caught.value) is SourceError
