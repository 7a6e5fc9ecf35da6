import struct

import pytest
from pydicom.encaps import encapsulate, encapsulate_extended

from gateway.codec import framemap
from gateway.errors import DicomFileError


def _reader(data: bytes):
    return lambda offset, n: data[offset : offset + n]


def _frames_of(data: bytes, fmap) -> list[bytes]:
    return [b"".join(data[o : o + n] for o, n in frame) for frame in fmap]


FRAMES = [
    b"\xff\xd8" + bytes([i]) * (10 + i) + b"\xff\xd9" + (b"\x00" if i % 2 == 0 else b"") for i in range(4)
]


def test_native_map_places_frames_back_to_back():
    fmap = framemap.native_map(100, 4 * 512, 512, 4)
    assert fmap == tuple(((100 + i * 512, 512),) for i in range(4))


def test_native_map_refuses_pixel_data_shorter_than_its_frames():
    with pytest.raises(DicomFileError, match="3 frame"):
        framemap.native_map(0, 1000, 512, 3)


def test_one_bit_frames_off_byte_boundary_are_refused():
    with pytest.raises(DicomFileError, match="1-bit"):
        framemap.frame_length(3, 3, 1, 1)


@pytest.mark.parametrize("has_bot", [True, False], ids=["bot", "empty-bot"])
def test_encapsulated_frames_one_fragment_each(has_bot):
    data = b"PAD!" + encapsulate(FRAMES, has_bot=has_bot) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    fmap = framemap.encapsulated_map(_reader(data), 4, len(data), len(FRAMES))
    assert _frames_of(data, fmap) == [f + b"\x00" * (len(f) % 2) for f in FRAMES]


def test_encapsulated_frames_of_several_fragments_follow_the_offset_table():
    data = encapsulate(FRAMES, fragments_per_frame=2, has_bot=True) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    fmap = framemap.encapsulated_map(_reader(data), 0, len(data), len(FRAMES))
    assert all(len(frame) == 2 for frame in fmap)
    assert _frames_of(data, fmap) == [f + b"\x00" * (len(f) % 2) for f in FRAMES]


def test_empty_offset_table_with_split_frames_uses_codestream_markers():
    data = encapsulate(FRAMES, fragments_per_frame=2, has_bot=False) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    fmap = framemap.encapsulated_map(_reader(data), 0, len(data), len(FRAMES))
    assert _frames_of(data, fmap) == [f + b"\x00" * (len(f) % 2) for f in FRAMES]


def test_extended_offset_table_wins():
    pixel, offsets, lengths = encapsulate_extended(FRAMES)
    data = pixel + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    n = len(FRAMES)
    table = (list(struct.unpack(f"<{n}Q", offsets)), list(struct.unpack(f"<{n}Q", lengths)))
    fmap = framemap.encapsulated_map(_reader(data), 0, len(data), n, table)
    assert _frames_of(data, fmap) == [f + b"\x00" * (len(f) % 2) for f in FRAMES]


def test_truncated_encapsulated_data_is_refused():
    data = encapsulate(FRAMES, has_bot=True)[:-5]
    with pytest.raises(DicomFileError, match="past the end|truncated"):
        framemap.encapsulated_map(_reader(data), 0, len(data), len(FRAMES))


def test_offset_table_with_wrong_entry_count_is_refused():
    data = encapsulate(FRAMES, has_bot=True) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    with pytest.raises(DicomFileError, match="entries"):
        framemap.encapsulated_map(_reader(data), 0, len(data), 3)


def test_ambiguous_fragments_without_table_are_refused():
    fragments = [b"\x01\x02" * 4] * 3  # no codestream markers, 3 fragments, 2 frames
    data = encapsulate(fragments, has_bot=False) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    with pytest.raises(DicomFileError, match="frame boundaries"):
        framemap.encapsulated_map(_reader(data), 0, len(data), 2)


@pytest.mark.parametrize(
    "fmap",
    [
        framemap.native_map(10, 300, 100, 3),
        (((10, 5), (20, 7)), ((40, 9),)),
    ],
    ids=["native", "fragments"],
)
def test_pack_round_trips_and_answers_per_frame(fmap):
    packed = framemap.pack(fmap)
    assert framemap.frame_count(packed) == len(fmap)
    for index, frame in enumerate(fmap):
        assert framemap.frame_fragments(packed, index) == frame
        assert framemap.frame_size(packed, index) == sum(n for _, n in frame)


def test_native_maps_pack_to_three_numbers_whatever_the_frame_count():
    assert framemap.pack(framemap.native_map(0, 10_000 * 8, 8, 10_000)) == {"native": [0, 8, 10_000]}


DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def test_read_items_ends_after_the_sequence_delimiter():
    pixel = encapsulate(FRAMES, has_bot=True)
    data = b"PAD!" + pixel + DELIMITER + b"after"
    items = framemap.read_items(_reader(data), 4, len(data))
    assert items.end == 4 + len(pixel) + len(DELIMITER)
    assert data[items.end :] == b"after"
    assert len(items.offset_table) == len(FRAMES) and len(items.fragments) == len(FRAMES)


def test_a_walk_already_done_is_not_repeated():
    data = encapsulate(FRAMES, has_bot=True) + DELIMITER
    items = framemap.read_items(_reader(data), 0, len(data))

    def no_reads(offset: int, n: int) -> bytes:
        raise AssertionError("read again")

    fmap = framemap.encapsulated_map(no_reads, 0, len(data), len(FRAMES), items=items)
    assert _frames_of(data, fmap) == [f + b"\x00" * (len(f) % 2) for f in FRAMES]


def test_an_offset_table_longer_than_any_real_one_is_refused_unread():
    header = struct.pack("<II", 0xE000FFFE, 64 * 1024 * 1024)
    reads = []

    def read_at(offset: int, n: int) -> bytes:
        reads.append(n)
        return header if offset == 0 else b"\x00" * n

    with pytest.raises(DicomFileError, match="Basic Offset Table"):
        framemap.read_items(read_at, 0, 1 << 40)
    assert reads == [8]


def test_an_extended_offset_table_pointing_past_the_pixel_data_is_refused():
    pixel, offsets, lengths = encapsulate_extended(FRAMES)
    data = pixel + DELIMITER + b"\x00" * 4096  # bytes after the pixel data: not a frame's
    n = len(FRAMES)
    table = (list(struct.unpack(f"<{n}Q", offsets)), list(struct.unpack(f"<{n}Q", lengths)))
    table[1][-1] += 1000
    with pytest.raises(DicomFileError, match="Extended Offset Table"):
        framemap.encapsulated_map(_reader(data), 0, len(data), n, table)


@pytest.mark.parametrize(
    ("fragments", "size", "inside"),
    [
        (((0, 10),), 10, True),
        (((0, 10), (20, 5)), 25, True),
        (((0, 10), (20, 6)), 25, False),
        (((-1, 4),), 25, False),
        (((2**40, 1),), 25, False),
    ],
    ids=["exact", "two-fragments", "one-past-the-end", "negative", "far-out"],
)
def test_within_tells_fragments_inside_a_file_of_a_size(fragments, size, inside):
    assert framemap.within(fragments, size) is inside
