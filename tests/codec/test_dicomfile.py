"""Header reading: elements after Pixel Data, the transfer syntax peek, and the bounds that keep a
hostile file from costing more than a header."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames

import gateway.codec.dicomfile as dicomfile
from gateway.codec import framemap
from gateway.codec.dicomfile import read_header
from gateway.errors import DicomFileError
from tests.codec.test_hostile_files import with_syntax
from tests.conftest import FIXTURES
from tests.helpers import BLOB, TRAILER_SOURCES

EXPLICIT = FIXTURES / TRAILER_SOURCES["explicit-le"]
DEFLATED = FIXTURES / TRAILER_SOURCES["deflated"]
DEFLATED_UID = b"1.2.840.10008.1.2.1.99"


def trailed() -> bytes:
    ds = pydicom.dcmread(EXPLICIT)
    ds.add_new(0x7FE10010, "LO", "GATEWAY TEST")
    ds.add_new(0x7FE11010, "LO", "after the pixels")
    ds.add_new(0x7FE11020, "OB", BLOB)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def meta(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return b"\x00" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


def element(number: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2sHI", 2, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, number, vr, len(value)) + value


def test_elements_after_pixel_data_are_in_the_header_and_pixel_data_keeps_its_place():
    ds, pixel = read_header(io.BytesIO(trailed()))
    assert ds[0x7FE11010].value == "after the pixels" and ds[0x7FE11020].value == BLOB
    tags = list(ds.keys())
    assert tags.index(0x7FE00010) < tags.index(0x7FE10010)
    assert pixel is not None and pixel.frames is not None and pixel.frame_error is None


def test_the_frame_map_of_a_file_with_a_trailer_is_the_one_without():
    _, plain = read_header(EXPLICIT)
    _, trailer = read_header(io.BytesIO(trailed()))
    assert plain is not None and trailer is not None
    assert plain.frames == trailer.frames


def test_a_file_whose_pixel_data_ends_it_costs_no_read_past_the_pixels():
    data = EXPLICIT.read_bytes()
    reads = []

    class Watched(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            reads.append((self.tell(), n))
            return super().read(n)

    read_header(Watched(data))
    _, pixel = read_header(EXPLICIT)
    assert pixel is not None
    assert not [offset for offset, _ in reads if offset >= pixel.value_offset]


def test_more_after_the_pixels_than_a_header_may_hold_is_refused(monkeypatch):
    data = trailed()
    _, pixel = read_header(EXPLICIT)
    assert pixel is not None
    monkeypatch.setattr(dicomfile, "MAX_HEADER_BYTES", pixel.value_offset + 100)  # the head fits
    with pytest.raises(DicomFileError, match="follow the pixel data"):
        read_header(io.BytesIO(data))


def test_bulk_values_after_pixel_data_are_found():
    assert dicomfile.bulk_value(trailed(), "7FE11020", "1.2.3") == BLOB


def test_a_meta_that_says_explicit_vr_for_implicit_data_maps_pydicoms_frames():
    # The file meta says explicit VR; pydicom finds implicit VR and reads it so: so must the map.
    path = get_testdata_file("SC_rgb_jpeg.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, pixel = read_header(path)
        full = pydicom.dcmread(path)
    assert pixel is not None and pixel.frames is not None and pixel.frame_error is None
    data = Path(path).read_bytes()
    served = b"".join(data[o : o + n] for o, n in framemap.frame_fragments(pixel.frames, 0))
    assert served == next(generate_frames(full.PixelData, number_of_frames=1))


def test_encapsulated_pixel_data_under_a_native_syntax_has_no_frames():
    source = FIXTURES / TRAILER_SOURCES["encapsulated-multiframe"]
    lying = with_syntax(source.read_bytes(), "1.2.840.10008.1.2.1")
    _, pixel = read_header(io.BytesIO(lying))
    assert pixel is not None and pixel.frames is None
    assert "encapsulated, but the transfer syntax" in (pixel.frame_error or "")


@pytest.mark.parametrize(
    ("head", "syntax"),
    [
        (meta(element(0x10, b"UI", b"1.2.840.10008.1.2.1\x00")), b"1.2.840.10008.1.2.1"),
        (meta(element(0x01, b"OB", b"\x00\x01"), element(0x10, b"UI", DEFLATED_UID)), DEFLATED_UID),
        (meta(element(0x02, b"UI", b"1.2\x00")), b""),
        (b"\x00" * 132, None),
        (meta(element(0x10, b"XX", b"1.2.840.10008.1.2.1\x00")), None),
        (meta(element(0x01, b"OB", b"\x00" * 5000)), None),
    ],
    ids=["explicit", "deflated", "no-syntax", "no-dicm", "unknown-vr", "meta-past-the-peek"],
)
def test_the_syntax_peek_answers_only_when_the_head_alone_tells(head, syntax):
    next_element = b"\x08\x00\x05\x00CS\x00\x00"  # group 8: the meta has ended
    assert dicomfile._peek_syntax(head[: dicomfile._PEEK] + next_element) == syntax


def bomb(inflated: int, padding: int = 0) -> bytes:
    """A deflated file that inflates to ``inflated`` bytes; ``padding`` bytes of meta before its
    syntax (so the peek cannot see it)."""
    data = DEFLATED.read_bytes()
    ds = pydicom.dcmread(DEFLATED)
    start = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    dataset = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = packer.compress(dataset + b"\x00" * (inflated - len(dataset))) + packer.flush()
    head = meta(
        element(0x01, b"OB", b"\x00" * padding + b"\x00\x01"),
        element(0x02, b"UI", str(ds.file_meta.MediaStorageSOPClassUID).encode() + b"\x00"),
        element(0x10, b"UI", DEFLATED_UID),
    )
    return head + body


@pytest.mark.parametrize("padding", [0, 6000], ids=["peeked", "meta-longer-than-the-peek"])
def test_a_deflate_bomb_is_refused_before_pydicom_inflates_it(monkeypatch, padding):
    monkeypatch.setattr(dicomfile, "MAX_INFLATED_BYTES", 1024 * 1024)
    data = bomb(8 * 1024 * 1024, padding)
    inflated = []
    real = zlib.decompress
    monkeypatch.setattr(zlib, "decompress", lambda *a, **k: inflated.append(1) or real(*a, **k))
    with pytest.raises(DicomFileError, match="inflates past"):
        read_header(io.BytesIO(data))
    assert inflated == []  # pydicom's whole-dataset inflate never ran


def test_a_deflated_file_under_the_bound_is_read_with_its_trailer():
    ds = pydicom.dcmread(DEFLATED)
    ds.add_new(0x7FE10010, "LO", "GATEWAY TEST")
    ds.add_new(0x7FE11010, "LO", "after the pixels")
    buffer = io.BytesIO()
    ds.save_as(buffer)
    header, pixel = read_header(io.BytesIO(buffer.getvalue()))
    assert header[0x7FE11010].value == "after the pixels"
    assert pixel is not None and pixel.mode == "decode"
    assert "PixelData" not in header or header[0x7FE00010].value is None
