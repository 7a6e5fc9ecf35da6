"""The in-memory source keeps the contract the real ones keep: harvest indexes it like a folder,
and what it serves is what the instances hold."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from gateway.errors import NotFound, SourceUnavailable
from gateway.registry.harvest import harvest
from gateway.registry.store import Registry
from gateway.stream.memory import MemorySource
from tests.stream.test_federation_memory import FRAME_BYTES, UID, frame_bytes, instance


def test_harvest_indexes_it_with_the_locations_it_serves_from(tmp_path: Path):
    source = MemorySource("memory", [instance()])
    registry = Registry(tmp_path / "registry.db")
    try:
        stats = harvest(registry, source)
        ds = instance()
        (indexed,) = registry.instance_location(ds.StudyInstanceUID, ds.SeriesInstanceUID, UID)
    finally:
        registry.close()
    assert stats.indexed == 1
    assert indexed.frames == source.location(UID).frames
    assert indexed.path == source.location(UID).path

    async def frame() -> bytes:
        return (await source.open_frame(indexed, 2)).first

    assert anyio.run(frame) == frame_bytes(2)


def test_a_frame_is_sent_in_chunks_of_the_size_asked_for():
    source = MemorySource("memory", [instance()], chunk=10)

    async def chunks() -> list[bytes]:
        frame = await source.open_frame(source.location(UID), 0)
        assert frame.length == FRAME_BYTES
        return [chunk async for chunk in frame.aiter_bytes()]

    sent = anyio.run(chunks)
    assert b"".join(sent) == frame_bytes(0) and {len(chunk) for chunk in sent[:-1]} == {10}


def test_a_bulk_element_it_lacks_is_not_found():
    source = MemorySource("memory", [instance()])

    async def bulk() -> list[bytes]:
        return [chunk async for chunk in source.aiter_bulk(source.location(UID), "00420011")]

    with pytest.raises(NotFound):
        anyio.run(bulk)


def test_batches_and_learning_are_offered_only_when_asked_for():
    plain = MemorySource("plain", [instance()])
    assert plain.batch is None and not plain.learns_on_retrieve
    learnt: list[str] = []
    batched = MemorySource(
        "batched", [instance()], batch=True, learns_on_retrieve=True, learn=lambda p, _: learnt.append(p)
    )
    assert batched.batch is not None and batched.learns_on_retrieve
    retrieval = batched.batch

    async def receive() -> list[bytes]:
        return [data async for data in retrieval.aiter_instances([batched.instance_file(UID)])]

    assert len(anyio.run(receive)) == 1 and learnt == [batched.location(UID).path]


def test_health_says_what_it_was_told():
    source = MemorySource("memory", status="PACS on fire")
    assert anyio.run(source.health) == "PACS on fire"


def test_an_unreachable_source_fails_before_its_first_byte():
    source = MemorySource("memory", [instance()], error=SourceUnavailable("source memory is unreachable"))

    async def instance_bytes() -> list[bytes]:
        return [chunk async for chunk in source.aiter_instance(source.instance_file(UID))]

    with pytest.raises(SourceUnavailable):
        anyio.run(instance_bytes)
