"""The DIMSE source's cache of received instances: bounded, and exact under repeated inserts."""

import anyio

from gateway.config import SourceConfig
from gateway.stream.dimse import source as dimse
from gateway.stream.dimse.source import DimseSource
from gateway.types import InstanceFile


def source() -> DimseSource:
    return DimseSource(SourceConfig(name="pacs", kind="dimse", host="127.0.0.1", port=104))


def test_the_same_instance_received_twice_is_counted_once():
    cache = source()
    cache._remember("1.2.3", b"x" * 100)
    cache._remember("1.2.3", b"x" * 100)  # two requests that missed it at the same time
    assert cache._cached == 100
    assert list(cache._cache) == ["1.2.3"]


def test_the_oldest_instances_leave_first_and_the_newest_stays(monkeypatch):
    monkeypatch.setattr(dimse, "_CACHE_BYTES", 250)
    cache = source()
    for uid in ("1", "2", "3"):
        cache._remember(uid, b"x" * 100)
    assert list(cache._cache) == ["2", "3"] and cache._cached == 200
    cache._remember("big", b"x" * 1000)  # larger than the bound: kept alone, for its own request
    assert list(cache._cache) == ["big"] and cache._cached == 1000


def test_a_header_is_learnt_only_while_the_index_lacks_its_stored_syntax():
    """Learning is a registry write on the retrieval's path: once an instance is learnt (its
    stored syntax indexed), retrieving it again learns nothing."""
    learnt: list[str] = []
    pacs = DimseSource(
        SourceConfig(name="pacs", kind="dimse", host="127.0.0.1", port=104),
        learn=lambda path, data: learnt.append(path),
    )
    path = "studies/1.2/series/1.2.3/instances/1.2.3.4"
    fresh = InstanceFile("pacs", path, 0, None, "1.2.3.4", "remote")
    known = fresh._replace(TransferSyntaxUID="1.2.840.10008.1.2.1")

    async def main() -> None:
        await pacs._learn(fresh, b"DICM")
        await pacs._learn(known, b"DICM")
        await pacs.aclose()

    anyio.run(main)
    assert learnt == [path]
