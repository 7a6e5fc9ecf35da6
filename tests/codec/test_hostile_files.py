"""A seeded fuzzer for harvest: hostile files and special entries in a real folder.

Real fixtures are mutated (bit flips, junk, truncations at every element and item boundary, huge and
undefined lengths, deeply nested sequences, transfer syntaxes that lie, a deflate bomb) and put in one
temporary folder beside special entries (a FIFO, a socket, a device, link loops, links out of the
folder, 1,100 nested directories, unreadable and oddly named files). The folder is harvested by the
real FolderSource into a real registry and served through the app in-process.

The invariant: harvest ends, in bounded time and without an exception; every entry is either indexed
correctly (its served instance is the file's bytes, its frames are pydicom's, its metadata names
every element pydicom reads after the pixel data) or refused with a reason (counted as failed, logged,
remembered); the rest of the folder is indexed all the same. The seed is fixed: a failure names the
file and the mutation, and reproduces.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import socket
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pydicom
import pytest
from pydicom.encaps import generate_fragments
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

import gateway.codec.dicomfile as dicomfile
import gateway.registry.store as store
from gateway.codec import framemap
from gateway.stream.folder import MAX_DEPTH
from tests.conftest import FIXTURES
from tests.helpers import ANY_FRAME, ANY_INSTANCE, expected_frames, nest, unnest, with_trailer, within_seconds
from tests.stream.test_folder_integrity import Served

SEED = 20240617
BUDGET = 20.0  # seconds the harvest may take, for a few hundred small files
BASES = {
    "ele": "GW-0001/A1001_ct_chest/s01_ct_explicit_vr_le_01.dcm",
    "ile": "GW-0001/A1001_ct_chest/s02_ct_implicit_vr_le_01.dcm",
    "ebe": "GW-0001/A1002_mr_brain/s01_mr_explicit_vr_be_01.dcm",
    "dfl": "GW-0001/A1002_mr_brain/s02_mr_deflated_explicit_vr_le_01.dcm",
    "mf5": "GW-0001/A1002_mr_brain/s03_sc_native_multiframe_5f_01.dcm",
    "bot": "GW-0002/B2002_us_abdomen/s01_us_jpegls_multiframe_bot_01.dcm",
    "nob": "GW-0002/B2002_us_abdomen/s02_us_jpegls_multiframe_no_bot_01.dcm",
    "frg": "GW-0002/B2002_us_abdomen/s03_us_jpegls_multiframe_2frag_bot_01.dcm",
    "eot": "GW-0002/B2002_us_abdomen/s04_us_jpegls_multiframe_eot_01.dcm",
}
SYNTAXES = [
    ImplicitVRLittleEndian,
    "1.2.840.10008.1.2.1",
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    "1.2.840.10008.1.2.4.50",  # an encapsulated syntax for native data
    "1.2.3.4",  # no transfer syntax at all
    "",
    None,  # no (0002,0010) element
]
_LONG = {vr.encode() for vr in EXPLICIT_VR_LENGTH_32}
ADDRESSABLE = re.compile(r"[!-.0-~]+")  # printable ASCII without "/" or space
_WEB_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRBigEndian)
AS_STORED = {uid for uid in SYNTAXES if uid and uid not in _WEB_SYNTAXES} | {
    "1.2.840.10008.1.2.4.80",  # the encapsulated bases
}


@dataclass(frozen=True)
class Element:
    start: int  # the element's first byte (its tag)
    value: int  # its value's first byte
    length_at: int  # where its length field is
    length_size: int  # 2 or 4
    length: int


def meta_elements(data: bytes) -> tuple[list[Element], int]:
    """The file meta elements (explicit VR little endian), and where the dataset starts."""
    position, out = 132, []
    while position + 8 <= len(data):
        group, _, vr = struct.unpack_from("<HH2s", data, position)
        if group != 2:
            break
        if vr in _LONG:
            (length,) = struct.unpack_from("<I", data, position + 8)
            out.append(Element(position, position + 12, position + 8, 4, length))
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            out.append(Element(position, position + 8, position + 6, 2, length))
        position = out[-1].value + length
    return out, position


def dataset_elements(data: bytes) -> list[Element]:
    """The top-level elements of the dataset as pydicom reads them (and those of sequence items,
    one level down), by their positions in ``data``."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    out = []

    def add(dataset: pydicom.Dataset, depth: int) -> None:
        for tag in list(dataset.keys()):
            element = dataset.get_item(tag)
            tell = getattr(element, "value_tell", None) or getattr(element, "file_tell", None)
            if tell is None:
                continue
            implicit = getattr(element, "is_implicit_VR", False)
            vr = (getattr(element, "VR", None) or "UN").encode()
            if implicit:
                out.append(Element(tell - 8, tell, tell - 4, 4, getattr(element, "length", 0) or 0))
            elif vr in _LONG:
                out.append(Element(tell - 12, tell, tell - 4, 4, getattr(element, "length", 0) or 0))
            else:
                out.append(Element(tell - 8, tell, tell - 2, 2, getattr(element, "length", 0) or 0))
            if depth == 0 and dataset[tag].VR == "SQ":
                for item in dataset[tag].value or []:
                    add(item, 1)

    add(ds, 0)
    return out


def with_syntax(data: bytes, syntax: str | None) -> bytes:
    """``data`` whose file meta names ``syntax`` (None: no Transfer Syntax UID element), the dataset
    left as it was: a file that lies about its encoding."""
    elements, end = meta_elements(data)
    pieces = []
    for element in elements[1:]:  # (0002,0000) is recomputed
        if struct.unpack_from("<HH", data, element.start)[1] == 0x0010:
            if syntax is None:
                continue
            value = syntax.encode() + (b"\x00" if len(syntax) % 2 else b"")
            pieces.append(struct.pack("<HH2sH", 2, 0x10, b"UI", len(value)) + value)
        else:
            pieces.append(data[element.start : element.value + element.length])
    body = b"".join(pieces)
    group_length = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body))
    return data[:132] + group_length + body + data[end:]


def nested(depth: int, implicit: bool, terminated: bool) -> bytes:
    """A ContentSequence (0040,A730) nested ``depth`` deep, of undefined lengths."""
    if implicit:
        open_sq = struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF)
    else:
        open_sq = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    open_item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (open_sq + open_item) * depth + (close * depth if terminated else b"")


def unique(data: bytes, uid: str, number: int) -> bytes:
    """``data`` with its SOP Instance UID made unique (same length: the layout does not move)."""
    return data.replace(uid.encode(), (uid[:-6] + f".{number:05d}").encode())


def mutations(name: str, data: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """(what was done, bytes) for one base file."""
    meta, start = meta_elements(data)
    elements = meta + dataset_elements(data)
    pixel = next(
        (e for e in elements if data[e.start : e.start + 4] in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")),
        None,
    )
    offsets = {0, 1, 127, 128, 131, 132, 133, start - 1, start, start + 1, len(data) - 1, len(data) - 8}
    for element in elements:
        offsets |= {element.start, element.start + 4, element.length_at, element.value, element.value + 1}
        if element.length < len(data):
            offsets |= {element.value + element.length - 1, element.value + element.length}
    if pixel is not None and pixel.length == 0xFFFFFFFF:
        try:
            items = framemap.read_items(lambda o, n: data[o : o + n], pixel.value, len(data))
        except Exception:
            items = None
        if items is not None:
            for offset, length in items.fragments:
                offsets |= {offset - 8, offset - 4, offset, offset + length - 1}
            offsets |= {items.end - 8, items.end - 1}
            bot_length_at = pixel.value + 4
            yield "huge-bot", data[:bot_length_at] + struct.pack("<I", 0x7FFFFFF0) + data[bot_length_at + 4 :]
            first = items.fragments[0][0] - 4
            yield "huge-fragment", data[:first] + struct.pack("<I", 0xFFFFFFF0) + data[first + 4 :]
    if name == "dfl":  # a compressed dataset: its boundaries are not the file's
        offsets |= {rng.randrange(start, len(data)) for _ in range(12)}
    for offset in sorted(o for o in offsets if 0 < o < len(data)):
        yield f"truncated-at-{offset}", data[:offset]
    for count in range(12):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        yield f"bit-flips-{count}", bytes(flipped)
    for count in range(4):
        junk = bytearray(data)
        at = rng.randrange(len(junk) - 16)
        junk[at : at + 16] = rng.randbytes(16)
        yield f"junk-{count}-at-{at}", bytes(junk)
    for element in rng.sample(elements, min(8, len(elements))):
        for value in (0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, len(data), 0):
            size, at = element.length_size, element.length_at
            field = struct.pack("<I", value) if size == 4 else struct.pack("<H", value & 0xFFFF)
            yield f"length-{value:x}-at-{at}", data[:at] + field + data[at + size :]
    if name != "dfl":
        for syntax in SYNTAXES:
            yield f"syntax-{syntax}", with_syntax(data, syntax)
        if pixel is not None:
            implicit = name == "ile"
            for depth, terminated in ((40, True), (3000, True), (3000, False)):
                deep = nested(depth, implicit, terminated)
                yield f"nested-{depth}-{terminated}", data[: pixel.start] + deep + data[pixel.start :]


def bomb(base: bytes, inflated: int) -> bytes:
    """A deflated file whose dataset inflates to ``inflated`` bytes (zeros after a valid dataset)."""
    _, start = meta_elements(base)
    dataset = zlib.decompress(base[start:], -zlib.MAX_WBITS)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = packer.compress(dataset) + packer.compress(b"\x00" * (inflated - len(dataset))) + packer.flush()
    return base[:start] + body


# -- the folder ---------------------------------------------------------------------------------------


@dataclass
class Case:
    path: str
    what: str
    expect: str  # "either" (a file: indexed correctly or refused), "refused", "indexed", "unlisted"


def build(folder: Path, outside: Path, rng: random.Random) -> list[Case]:
    cases: list[Case] = []
    number = 0
    for name, relative in BASES.items():
        source = FIXTURES / relative
        ds = pydicom.dcmread(source)
        uid = str(ds.SOPInstanceUID)
        # A fixed-length UID, so each mutated file can carry its own without moving a byte.
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid + ".00000"
        buffer = io.BytesIO()
        ds.save_as(buffer)
        base = buffer.getvalue()
        bases = [(name, base)]
        if name == "ele":
            trailer = folder / "trailer-base.dcm"
            with_trailer(source, trailer)
            t = pydicom.dcmread(trailer)
            t.SOPInstanceUID = t.file_meta.MediaStorageSOPInstanceUID = uid + ".99999"
            buffer = io.BytesIO()
            t.save_as(buffer)
            trailer.unlink()
            bases.append(("trl", buffer.getvalue()))
        for label, data in bases:
            for what, mutated in mutations(label, data, rng):
                number += 1
                path = f"{label}-{number:05d}.dcm"
                if label == "dfl":  # the UID is inside the compressed stream: this one is shared
                    (folder / path).write_bytes(mutated)
                else:
                    (folder / path).write_bytes(unique(mutated, uid + ".00000", number))
                cases.append(Case(path, f"{label} {what}", "either"))
        if name == "dfl":
            (folder / "deflate-bomb.dcm").write_bytes(bomb(base, 4 * 1024 * 1024))
            cases.append(Case("deflate-bomb.dcm", "dfl inflating to 4 MiB, past the limit", "refused"))
    cases += specials(folder, outside)
    return cases


def specials(folder: Path, outside: Path) -> list[Case]:
    good = (FIXTURES / BASES["ele"]).read_bytes()
    special = folder / "special"
    special.mkdir()
    cases = []

    def case(path: str, what: str, expect: str) -> None:
        cases.append(Case(f"special/{path}", what, expect))

    os.mkfifo(special / "fifo.dcm")
    case("fifo.dcm", "a FIFO", "refused")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(special / "sock.dcm"))
    listener.close()  # the socket file stays
    case("sock.dcm", "a socket", "refused")
    try:
        os.mknod(special / "null.dcm", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        case("null.dcm", "a character device", "refused")
    except (PermissionError, OSError):
        pass  # not allowed here (a container without CAP_MKNOD): nothing to check
    (special / "loop-a").symlink_to("loop-b")
    (special / "loop-b").symlink_to("loop-a")
    case("loop-a", "a link loop", "refused")
    case("loop-b", "a link loop", "refused")
    (special / "self").symlink_to(".")
    case("self", "a link to its own directory", "refused")
    (outside / "stolen.dcm").write_bytes(good)
    (special / "out.dcm").symlink_to(outside / "stolen.dcm")
    case("out.dcm", "an absolute link out of the folder", "refused")
    (special / "out-relative.dcm").symlink_to(Path("..") / ".." / outside.name / "stolen.dcm")
    case("out-relative.dcm", "a relative link out of the folder", "refused")
    (special / "passwd").symlink_to("/etc/passwd")
    case("passwd", "a link to /etc/passwd", "refused")
    (special / "out-dir").symlink_to(outside)
    case("out-dir", "a link to a directory outside", "refused")
    (special / "dangling.dcm").symlink_to("nowhere.dcm")
    case("dangling.dcm", "a dangling link", "refused")
    (special / "inside.dcm").write_bytes(good)
    (special / "link-inside.dcm").symlink_to("inside.dcm")
    case("inside.dcm", "a plain file", "indexed")
    case("link-inside.dcm", "a link inside the folder", "indexed")
    (special / "empty.dcm").write_bytes(b"")
    case("empty.dcm", "an empty file", "refused")
    (special / "locked.dcm").write_bytes(good)
    (special / "locked.dcm").chmod(0)
    case("locked.dcm", "an unreadable file (readable by root)", "either")
    with open(os.path.join(os.fsencode(special), b"bad-\xff-name.dcm"), "wb") as fp:
        fp.write(good)
    cases.append(Case("special/bad-\\udcff-name.dcm", "a name that is not UTF-8", "refused"))
    (special / "new\nline.dcm").write_bytes(b"not DICOM\n")
    case("new\nline.dcm", "a name with a newline", "refused")
    deepest = nest(special, 1100)
    (deepest / "deepest.dcm").write_bytes(good)
    case("/".join(["d"] * MAX_DEPTH), "the directory past the depth bound", "refused")
    return cases


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, list[Case]]]:
    monkeypatch.setattr(store, "_CACHE_CHECK", 0.0)
    monkeypatch.setattr(dicomfile, "MAX_INFLATED_BYTES", 1024 * 1024)  # the bomb, small and quick
    folder = tmp_path / "archive"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        yield folder, build(folder, outside, random.Random(SEED))
    finally:
        unnest(folder / "special")


def test_hostile_files_are_indexed_correctly_or_refused_with_a_reason(hostile, tmp_path, caplog):
    folder, cases = hostile
    caplog.set_level(logging.WARNING, "gateway.harvest")
    # pydicom warns about much of this; production logs it, tests must not turn it into errors
    # (the invariant is about what harvest does with the file, not about pydicom's warnings).
    with _quiet():
        served = within_seconds(lambda: Served(folder, tmp_path / "registry.db"), BUDGET)
    stats = served.stats
    registry = served.gateway.registry
    rejects = served.rejects()
    indexed = served.paths()
    assert stats.seen == stats.indexed + stats.failed and stats.indexed > 50
    assert not rejects.keys() & indexed
    assert all(reasons for reasons in rejects.values())
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert logged.count(" not indexed: ") == stats.failed
    for case in cases:
        where = "refused" if case.path in rejects else "indexed" if case.path in indexed else "missing"
        assert where != "missing", f"{case.path} ({case.what}) was neither indexed nor refused"
        assert case.expect in ("either", where), (
            f"{case.path} ({case.what}): {where}, {rejects.get(case.path)}"
        )

    held: dict[str, int] = {}
    for row in registry.query("SELECT SOPInstanceUID, COUNT(*) FROM locations GROUP BY 1"):
        held[row[0]] = row[1]
    rows = registry.query(
        "SELECT l.path, l.frames, l.mode, l.TransferSyntaxUID, l.SOPInstanceUID, i.SeriesInstanceUID, "
        "se.StudyInstanceUID "
        "FROM locations l JOIN instances i ON i.SOPInstanceUID = l.SOPInstanceUID "
        "JOIN series se ON se.SeriesInstanceUID = i.SeriesInstanceUID"
    )
    checked = 0
    for row in rows:
        if held[row["SOPInstanceUID"]] > 1:
            continue  # a flip made two files one instance: which file serves it is the registry's choice
        uids = (row["StudyInstanceUID"], row["SeriesInstanceUID"], row["SOPInstanceUID"])
        if not all(ADDRESSABLE.fullmatch(uid) for uid in uids):
            continue  # a flip put a control character or a slash in a UID: no URL names it
        with _quiet():
            checked += check_indexed(served, folder, row)
    assert checked > 50

    again = within_seconds(served.harvest, BUDGET)
    assert (again.indexed, again.failed, again.skipped) == (0, 0, stats.seen)  # all remembered


def check_indexed(served: Served, folder: Path, row: dict) -> int:
    """Served bytes of one indexed file against the file and pydicom's reading of it."""
    path = folder / row["path"]
    label = f"{row['path']}"
    url = (
        f"/dicom-web/studies/{row['StudyInstanceUID']}/series/{row['SeriesInstanceUID']}"
        f"/instances/{row['SOPInstanceUID']}"
    )
    response = served.client.get(url, headers={"Accept": ANY_INSTANCE})
    if row["TransferSyntaxUID"] in AS_STORED:
        assert response.status_code == 200, (label, response.text)
        assert payloads(response) == [path.read_bytes()], label
    else:
        # Implicit VR and big endian files (and what is indexed without a syntax: no pixel data)
        # are re-encoded for the web (PS3.18 8.7.3.3.1): a valid file, or a clean 502.
        assert response.status_code in (200, 502), (label, response.text)
        if response.status_code == 200:
            pydicom.dcmread(io.BytesIO(payloads(response)[0]))
    # What /metadata joins: the stored fragment (read here, a request per file costs seconds).
    ((stored,),) = served.gateway.registry.query(
        "SELECT metadata FROM instances WHERE SOPInstanceUID = ?", (row["SOPInstanceUID"],)
    )
    body = orjson.loads(stored)
    try:
        full = pydicom.dcmread(path)
    except Exception:
        full = None  # past what pydicom reads whole: the file's own bytes were the check
    if full is not None:
        after = {f"{int(tag):08X}" for tag in full.keys() if 0x7FE00010 < tag < 0xFFFCFFFC}
        assert after <= body.keys(), (label, "elements after the pixel data are missing")
    frames = framemap.frame_count(orjson.loads(row["frames"])) if row["frames"] else 0
    if not frames or row["mode"] == "decode":
        return 1
    numbers = ",".join(str(n) for n in range(1, frames + 1))
    response = served.client.get(f"{url}/frames/{numbers}", headers={"Accept": ANY_FRAME})
    assert response.status_code == 200, (label, response.text)
    served_frames = payloads(response)
    if full is None or "PixelData" not in full:
        return 1
    try:
        if full.file_meta.TransferSyntaxUID.is_encapsulated:
            # Frames may be grouped from fragments in more than one defensible way; their bytes
            # are pydicom's fragments, all of them and nothing else.
            expected = b"".join(list(generate_fragments(full.PixelData))[1:])  # the first: the BOT
            assert b"".join(served_frames) == expected, (label, "frames are not the fragments")
            return 1
        reference = expected_frames(full)
    except (AssertionError, KeyError):
        raise
    except Exception:
        return 1  # pydicom cannot split these frames: the instance bytes were the check
    assert served_frames == reference[: len(served_frames)], (label, "frames differ from pydicom's")
    return 1


def payloads(response: Any) -> list[bytes]:
    """The parts of a multipart/related body (the standard library's MIME parser, used by the
    retrieve tests, takes a second per hundred parts)."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    pieces = response.content.split(b"--" + boundary)
    assert pieces[0] == b"" and pieces[-1] in (b"--", b"--\r\n")
    return [piece.split(b"\r\n\r\n", 1)[1][:-2] for piece in pieces[1:-1]]


class _quiet:
    """Warnings ignored inside (pytest turns them into errors for the whole run otherwise)."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)
