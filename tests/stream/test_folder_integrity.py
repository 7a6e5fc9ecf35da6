"""A folder's files are not trusted after indexing: links out of the folder, files swapped or
rewritten since harvest, odd entries (FIFO, socket, deep trees) and elements after Pixel Data, each
in a real folder, harvested by the real FolderSource and served through the app in-process."""

from __future__ import annotations

import base64
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pydicom
import pytest

import gateway.registry.store as store
from fixtures.generate import make_ct_study
from gateway.app import create_app
from gateway.errors import SourceError
from gateway.service import Gateway
from gateway.stream.folder import MAX_DEPTH, FolderSource
from gateway.types import InstanceFile, Location
from tests.conftest import FIXTURES, Client, make_config
from tests.helpers import (
    ANY_FRAME,
    ANY_INSTANCE,
    BLOB,
    TRAILER_SOURCES,
    expected_frames,
    instance_url,
    nest,
    parts,
    unnest,
    with_trailer,
    within_seconds,
)

NAME = "archive"


@pytest.fixture(autouse=True)
def fresh_locations(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every lookup sees the last harvest (the cache otherwise lives up to half a second).
    monkeypatch.setattr(store, "_CACHE_CHECK", 0.0)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / NAME
    make_ct_study(root, n_instances=3, rows=16, cols=16, seed=3)
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    place = tmp_path / "outside"
    place.mkdir()
    return place


class Served:
    """A gateway over one folder, harvested, with an in-process client."""

    def __init__(self, folder: Path, db: Path) -> None:
        self.gateway = Gateway(make_config(folder, db, NAME))
        self.client = Client(create_app(self.gateway))
        self.stats = self.harvest()

    def harvest(self) -> Any:
        return within_seconds(lambda: self.gateway.harvest(NAME), 20)

    def rejects(self) -> dict[str, str]:
        return {
            r["path"]: r["reason"] for r in self.gateway.registry.query("SELECT path, reason FROM rejects")
        }

    def paths(self) -> set[str]:
        return {r["path"] for r in self.gateway.registry.query("SELECT path FROM locations")}

    def frame(self, ds: pydicom.Dataset, number: int = 1) -> Any:
        return self.client.get(f"{instance_url(ds)}/frames/{number}", headers={"Accept": ANY_FRAME})

    def instance(self, ds: pydicom.Dataset) -> Any:
        return self.client.get(instance_url(ds), headers={"Accept": ANY_INSTANCE})


@pytest.fixture
def served(folder: Path, tmp_path: Path) -> Iterator[Served]:
    s = Served(folder, tmp_path / "registry.db")
    yield s
    s.gateway.registry.close()


def first(folder: Path) -> tuple[Path, pydicom.Dataset]:
    path = sorted(folder.glob("*.dcm"))[0]
    return path, pydicom.dcmread(path)


# -- links ------------------------------------------------------------------------------------------


def test_a_link_out_of_the_folder_is_refused_with_a_reason(folder, outside, tmp_path):
    secret = outside / "other.dcm"
    shutil.copy(sorted(folder.glob("*.dcm"))[0], secret)
    (folder / "escape.dcm").symlink_to(secret)
    (folder / "escape-relative.dcm").symlink_to(Path("..") / "outside" / "other.dcm")
    served = Served(folder, tmp_path / "registry.db")
    rejects = served.rejects()
    assert "leads out of the folder" in rejects["escape.dcm"]
    assert "leads out of the folder" in rejects["escape-relative.dcm"]
    assert served.paths() == {p.name for p in folder.glob("CT*.dcm")}


def test_a_link_inside_the_folder_is_indexed_and_served(folder, tmp_path):
    path, ds = first(folder)
    (folder / "sub").mkdir()
    target = folder / "sub" / "moved.dcm"
    path.rename(target)
    (folder / "link.dcm").symlink_to(Path("sub") / "moved.dcm")
    served = Served(folder, tmp_path / "registry.db")
    assert {"link.dcm", "sub/moved.dcm"} <= served.paths()
    response = served.instance(ds)
    assert response.status_code == 200
    assert parts(response)[0][1] == target.read_bytes()


def test_an_absolute_link_naming_the_folder_is_followed_inside_it(folder, tmp_path):
    path, ds = first(folder)
    (folder / "abs.dcm").symlink_to(path.resolve())
    served = Served(folder, tmp_path / "registry.db")
    assert "abs.dcm" in served.paths()
    assert served.rejects() == {}


def test_links_to_directories_loops_and_dangling_links_are_refused_not_followed(folder, tmp_path):
    (folder / "sub").mkdir()
    shutil.copy(sorted(folder.glob("*.dcm"))[0], folder / "sub" / "copy.dcm")
    (folder / "to-sub").symlink_to("sub")
    (folder / "to-self").symlink_to(".")
    (folder / "loop-a").symlink_to("loop-b")
    (folder / "loop-b").symlink_to("loop-a")
    (folder / "dangling.dcm").symlink_to("nowhere.dcm")
    served = Served(folder, tmp_path / "registry.db")
    rejects = served.rejects()
    assert "a directory" in rejects["to-sub"] and "a directory" in rejects["to-self"]
    assert "loop" in rejects["loop-a"] and "loop" in rejects["loop-b"]
    assert "to nothing" in rejects["dangling.dcm"]
    assert not any(path.startswith("to-") for path in served.paths())  # no file walked twice


# -- files changed since indexing ---------------------------------------------------------------------


def test_a_file_rewritten_with_a_longer_header_is_refused_then_reindexed(served, folder):
    path, ds = first(folder)
    assert served.frame(ds).status_code == 200
    ds.ImageComments = "x" * 200  # the pixel data moves 200 bytes further into the file
    ds.save_as(path)
    response = served.frame(ds)
    assert response.status_code == 502
    assert f"source {NAME}" in response.text and "changed since it was indexed" in response.text
    stats = served.harvest()
    assert stats.indexed == 1
    response = served.frame(ds)
    assert response.status_code == 200
    assert parts(response)[0][1] == expected_frames(pydicom.dcmread(path))[0]


def test_a_file_rewritten_at_the_same_size_is_refused_by_its_time(served, folder):
    path, ds = first(folder)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))  # a time other than the indexed one, whatever the clock's resolution
    response = served.frame(ds)
    assert response.status_code == 502
    assert "rewritten" in response.text


def test_a_file_swapped_for_a_link_to_a_large_outside_file_is_not_served(served, folder, outside):
    path, ds = first(folder)
    big = outside / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    path.unlink()
    path.symlink_to(big)
    for response in (served.instance(ds), served.frame(ds)):
        assert response.status_code == 502
        assert big.read_bytes()[:4096] not in response.content
        assert "leads out of the folder" in response.text
    stats = served.harvest()
    assert stats.failed == 1 and "leads out of the folder" in served.rejects()[path.name]
    assert served.instance(ds).status_code == 404  # its only location went with the next harvest


def test_a_directory_swapped_for_a_link_out_is_refused_even_with_matching_size_and_time(tmp_path, outside):
    folder = tmp_path / NAME
    make_ct_study(folder / "series", n_instances=1, rows=16, cols=16, seed=4)
    (path,) = sorted((folder / "series").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    served = Served(folder, tmp_path / "registry.db")
    # Outside, a file at the same relative place, with the same size and modification time.
    decoy = outside / "series" / path.name
    decoy.parent.mkdir()
    data = bytearray(path.read_bytes())
    data[-64:] = b"\xaa" * 64
    decoy.write_bytes(bytes(data))
    shutil.copystat(path, decoy)
    shutil.rmtree(folder / "series")
    (folder / "series").symlink_to(outside / "series")
    for response in (served.instance(ds), served.frame(ds)):
        assert response.status_code == 502, response.text
        assert b"\xaa" * 64 not in response.content


def test_a_file_swapped_for_a_fifo_is_refused_without_waiting(served, folder):
    path, ds = first(folder)
    path.unlink()
    os.mkfifo(path)
    response = within_seconds(lambda: served.frame(ds), 10)
    assert response.status_code == 502
    assert "a FIFO, not a regular file" in response.text


def test_a_change_found_while_serving_is_reported_to_the_changed_hook(folder):
    path, ds = first(folder)
    st = path.stat()
    location = InstanceFile(
        NAME, path.name, st.st_size, str(ds.file_meta.TransferSyntaxUID), str(ds.SOPInstanceUID), "direct",
        mtime_ns=st.st_mtime_ns,
    )  # fmt: skip
    seen: list[str] = []
    source = FolderSource(NAME, folder, changed=seen.append)
    path.write_bytes(path.read_bytes() + b"\x00" * 10)

    async def read() -> list[bytes]:
        try:
            return [chunk async for chunk in source.aiter_instance(location)]
        finally:
            await source.aclose()

    with pytest.raises(SourceError, match="changed since it was indexed"):
        anyio.run(read)
    assert seen == [path.name]


def test_a_frame_map_outside_its_file_reads_nothing(folder):
    path, ds = first(folder)
    size = path.stat().st_size
    location = Location(
        NAME, path.name, size, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
        str(ds.file_meta.TransferSyntaxUID), "direct", False, {"native": [size - 10, 512, 1]}, None, 0,
        mtime_ns=path.stat().st_mtime_ns,
    )  # fmt: skip

    async def read() -> bytes:
        return (await FolderSource(NAME, folder).open_frame(location, 0)).first

    with pytest.raises(SourceError, match="outside its file"):
        anyio.run(read)


def test_a_file_changed_between_listing_and_reading_is_refused_for_this_harvest(folder):
    source = FolderSource(NAME, folder)
    entries = list(source.scan())
    path = folder / entries[0].path
    path.write_bytes(path.read_bytes() + b"\x00" * 4)
    with pytest.raises(Exception, match="changed while being indexed"):
        source.read_header(entries[0])


# -- odd entries -----------------------------------------------------------------------------------------


def test_a_fifo_and_a_socket_are_counted_and_never_opened(folder, tmp_path):
    os.mkfifo(folder / "pipe.dcm")
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(folder / "socket.dcm"))
        served = Served(folder, tmp_path / "registry.db")  # a FIFO opened to read blocks forever
    finally:
        listener.close()
    assert served.stats.failed == 2 and served.stats.indexed == 3
    rejects = served.rejects()
    assert rejects["pipe.dcm"] == "a FIFO, not a regular file"
    assert rejects["socket.dcm"] == "a socket, not a regular file"
    again = served.harvest()
    assert (again.failed, again.skipped) == (0, 5)  # remembered: not looked at again


def test_a_deep_tree_is_walked_to_its_bound_and_the_rest_of_the_folder_indexed(folder, tmp_path):
    deepest = nest(folder, 1100)
    try:
        shutil.copy(sorted(folder.glob("*.dcm"))[0], folder.joinpath(*["d"] * 5) / "shallow.dcm")
        make_ct_study(deepest, n_instances=1, rows=16, cols=16, seed=9)
        served = Served(folder, tmp_path / "registry.db")
        assert served.stats.indexed == 4  # the three at the top, and the one five levels down
        ((path, reason),) = served.rejects().items()
        assert path == "/".join(["d"] * (MAX_DEPTH + 1)) and f"more than {MAX_DEPTH}" in reason
    finally:
        unnest(folder)


def test_a_directory_that_cannot_be_listed_is_counted_and_the_rest_indexed(folder, tmp_path, monkeypatch):
    (folder / "locked").mkdir()
    shutil.copy(sorted(folder.glob("*.dcm"))[0], folder / "locked" / "hidden.dcm")
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if str(path).rstrip("/").endswith("locked"):
            raise PermissionError(13, "Permission denied")  # what a non-root reader gets
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    served = Served(folder, tmp_path / "registry.db")
    assert served.stats.indexed == 3
    assert served.rejects() == {"locked": "directory cannot be listed (Permission denied)"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_counted_and_the_rest_indexed(folder, tmp_path):
    locked = folder / "locked.dcm"
    shutil.copy(sorted(folder.glob("*.dcm"))[0], locked)
    locked.chmod(0)
    served = Served(folder, tmp_path / "registry.db")
    assert served.stats.indexed == 3
    assert "Permission denied" in served.rejects()["locked.dcm"]


def test_a_name_that_is_not_utf8_is_refused_and_the_rest_indexed(folder, tmp_path):
    shutil.copy(sorted(folder.glob("*.dcm"))[0], os.path.join(os.fsencode(folder), b"\xff\xfe.dcm"))
    served = Served(folder, tmp_path / "registry.db")
    assert served.stats.indexed == 3
    assert list(served.rejects().values()) == ["file name is not valid UTF-8"]


# -- elements after Pixel Data -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TRAILER_SOURCES), ids=list(TRAILER_SOURCES))
def test_private_elements_after_pixel_data_reach_metadata(kind, tmp_path):
    folder = tmp_path / NAME
    folder.mkdir()
    ds = with_trailer(FIXTURES / TRAILER_SOURCES[kind], folder / "trailer.dcm")
    served = Served(folder, tmp_path / "registry.db")
    assert served.stats.indexed == 1, served.rejects()
    response = served.client.get(f"{instance_url(ds)}/metadata")
    assert response.status_code == 200
    (body,) = response.json()
    if kind == "implicit-le":  # a private element of unknown VR: UN, its bytes as they are
        assert body["7FE11010"] == {
            "vr": "UN",
            "InlineBinary": base64.b64encode(b"after the pixels").decode(),
        }
        assert body["8E051001"] == {"vr": "UN", "InlineBinary": base64.b64encode(b"\x07\x00").decode()}
    else:
        assert body["7FE11010"] == {"vr": "LO", "Value": ["after the pixels"]}
        assert body["8E051001"] == {"vr": "US", "Value": [7]}
    assert list(body).index("7FE00010") < list(body).index("7FE10010")  # tag order kept
    bulk = served.client.get(body["7FE11020"]["BulkDataURI"], headers={"Accept": ANY_FRAME})
    assert bulk.status_code == 200 and parts(bulk)[0][1] == BLOB
    frames = expected_frames(pydicom.dcmread(folder / "trailer.dcm"))
    numbers = ",".join(str(n) for n in range(1, len(frames) + 1))
    response = served.client.get(f"{instance_url(ds)}/frames/{numbers}", headers={"Accept": ANY_FRAME})
    assert response.status_code == 200
    assert [data for _, data in parts(response)] == frames


def test_zero_padding_after_pixel_data_adds_no_element(tmp_path):
    folder = tmp_path / NAME
    folder.mkdir()
    path = folder / "padded.dcm"
    shutil.copy(FIXTURES / TRAILER_SOURCES["explicit-le"], path)
    with path.open("ab") as fp:
        fp.write(b"\x00" * 512)  # some writers pad files to a block
    ds = pydicom.dcmread(path)
    served = Served(folder, tmp_path / "registry.db")
    (body,) = served.client.get(f"{instance_url(ds)}/metadata").json()
    assert "00000000" not in body and list(body)[-1] == "7FE00010"


def test_without_proc_the_walk_alone_opens_and_refuses_the_same(folder, outside, tmp_path, monkeypatch):
    import gateway.stream.safeopen as safeopen

    monkeypatch.setattr(safeopen, "_HAVE_PROC", False)  # as on a system without /proc
    (folder / "escape.dcm").symlink_to(outside)
    served = Served(folder, tmp_path / "registry.db")
    assert served.stats.indexed == 3 and "leads out of the folder" in served.rejects()["escape.dcm"]
    path, ds = first(folder)
    response = served.frame(ds)
    assert response.status_code == 200
    assert parts(response)[0][1] == expected_frames(pydicom.dcmread(path))[0]
    path.unlink()
    path.symlink_to(outside / "x.dcm")
    assert "leads out of the folder" in served.frame(ds).text
