"""Frame byte maps: where each frame of an instance lies in its file.

Computed once at harvest from the Pixel Data element header, so that a frame request is a lookup and
a ranged read, never a parse (PS3.5 Annex A.4 for encapsulation). Parsing here does no I/O of its
own: it is given a ``read_at(offset, length) -> bytes`` callable, so tests feed it byte strings.

A map is a tuple of frames; each frame is a tuple of ``(offset, length)`` fragments in file order.
Native frames have one fragment each. It serialises to a compact JSON form for the registry:
``{"native": [offset, frame_length, count]}`` or ``{"fragments": [[[off, len], ...], ...]}``, and for
files whose frames must be decoded (deflated) ``{"decode": [frame_length, count]}``. Remote sources
record ``{"remote": count, "bulk": {tag_path: upstream URI}}``: their frames are fetched by number.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.errors import DicomFileError
from gateway.types import Packed

__all__ = [
    "FrameMap",
    "Items",
    "native_map",
    "read_items",
    "encapsulated_map",
    "pack",
    "frame_length",
    "frame_count",
    "frame_fragments",
    "frame_size",
    "within",
]

Fragment = tuple[int, int]
FrameMap = tuple[tuple[Fragment, ...], ...]
ReadAt = Callable[[int, int], bytes]

_ITEM = 0xE000FFFE  # (FFFE,E000) as read from little endian "FE FF 00 E0"
_SEQ_DELIMITER = 0xE0DDFFFE
_MAX_FRAGMENTS = 1_000_000  # a hostile file cannot make us walk forever
# A Basic Offset Table holds 4 bytes a frame: 16 MiB is 4 million frames. A hostile length up to the
# file size (gigabytes) would otherwise be read into memory whole.
_MAX_TABLE = 16 * 1024 * 1024

# First bytes of a codestream, used to find frame starts when the Basic Offset Table is empty
# and frames span several fragments (PS3.5 A.4: the table "may" be empty).
_FRAME_STARTS = (
    b"\xff\xd8",  # JPEG family and JPEG-LS: SOI marker
    b"\xff\x4f",  # JPEG 2000 codestream: SOC marker
    b"\x00\x00\x00\x0c",  # JP2 file format signature box
)


def frame_length(rows: int, columns: int, samples: int, bits_allocated: int) -> int:
    """Bytes in one native frame (PS3.5 8.1.1); 1-bit frames must fill whole bytes to be mapped."""
    bits = rows * columns * samples * bits_allocated
    if bits % 8:
        raise DicomFileError("1-bit frames that do not end on a byte boundary cannot be mapped")
    return bits // 8


def native_map(value_offset: int, value_length: int, frame_len: int, count: int) -> FrameMap:
    if frame_len <= 0 or count <= 0:
        raise DicomFileError("pixel data without frames (Rows, Columns or NumberOfFrames is zero)")
    if value_length < frame_len * count:
        raise DicomFileError(
            f"pixel data holds {value_length} bytes, {count} frame(s) need {frame_len * count}"
        )
    return tuple(((value_offset + i * frame_len, frame_len),) for i in range(count))


@dataclass(frozen=True)
class Items:
    """The items of encapsulated Pixel Data (PS3.5 A.4) as laid out in the file."""

    offset_table: list[int]  # the Basic Offset Table's entries (empty when the table is)
    fragments: list[Fragment]  # (offset, length) of each fragment's bytes, in file order
    end: int  # the first byte after the Sequence Delimitation Item: where the next element starts


def read_items(read_at: ReadAt, first_item: int, end: int) -> Items:
    """Walk the items of encapsulated Pixel Data whose first item (the Basic Offset Table) is at
    ``first_item``, to its Sequence Delimitation Item; ``end`` bounds the walk (file size)."""
    position = first_item
    header = read_at(position, 8)
    if len(header) < 8:
        raise DicomFileError("encapsulated pixel data is truncated before its offset table")
    tag, length = struct.unpack("<II", header)
    if tag != _ITEM:
        raise DicomFileError("encapsulated pixel data does not start with an offset table item")
    if length % 4 or position + 8 + length > end or length > _MAX_TABLE:
        raise DicomFileError("Basic Offset Table has an invalid length")
    table = read_at(position + 8, length)
    if len(table) < length:
        raise DicomFileError("encapsulated pixel data is truncated in its offset table")
    bot = list(struct.unpack(f"<{length // 4}I", table))
    position += 8 + length
    fragments: list[Fragment] = []
    while True:
        header = read_at(position, 8)
        if len(header) < 8:
            raise DicomFileError("encapsulated pixel data is truncated (no sequence delimiter)")
        tag, length = struct.unpack("<II", header)
        if tag == _SEQ_DELIMITER:
            return Items(bot, fragments, position + 8)
        if tag != _ITEM:
            raise DicomFileError(f"unexpected tag {tag:08X} among pixel data fragments")
        if position + 8 + length > end:
            raise DicomFileError("a pixel data fragment runs past the end of the file")
        fragments.append((position + 8, length))
        if len(fragments) > _MAX_FRAGMENTS:
            raise DicomFileError("too many pixel data fragments")
        position += 8 + length


def encapsulated_map(
    read_at: ReadAt,
    first_item: int,
    end: int,
    count: int,
    extended: tuple[Sequence[int], Sequence[int]] | None = None,
    items: Items | None = None,
) -> FrameMap:
    """Map the frames of encapsulated Pixel Data whose first item (the Basic Offset Table) is at
    ``first_item``; ``end`` bounds the walk (file size). ``extended`` is the Extended Offset Table
    (offsets, lengths), which wins when present (PS3.5 A.4, Table A.4-1 note). ``items``: the
    walk of ``read_items``, when the caller has it already (a header read needs its end)."""
    if items is None:
        items = read_items(read_at, first_item, end)
    bot, fragments = items.offset_table, items.fragments
    if not fragments:
        raise DicomFileError("encapsulated pixel data has no fragments")
    first_fragment = fragments[0][0] - 8  # offsets in the tables count from the item tag
    if extended is not None:
        offsets, lengths = extended
        if len(offsets) != count or len(lengths) != count:
            raise DicomFileError("Extended Offset Table does not have one entry per frame")
        frames = tuple(((first_fragment + off + 8, length),) for off, length in zip(offsets, lengths))
        # The table is the file's word, not checked against the items: a hostile one may point
        # anywhere, so its frames must at least end before the sequence delimiter.
        if not all(within(frame, items.end - 8) for frame in frames):
            raise DicomFileError("Extended Offset Table points outside the pixel data")
        return frames
    if bot:
        return _group_by_offsets(fragments, first_fragment, bot, count)
    if count == 1:
        return (tuple(fragments),)
    if len(fragments) == count:
        return tuple((fragment,) for fragment in fragments)
    return _group_by_markers(read_at, fragments, count)


def _group_by_offsets(fragments: list[Fragment], first_fragment: int, bot: list[int], count: int) -> FrameMap:
    if len(bot) != count:
        raise DicomFileError(f"Basic Offset Table has {len(bot)} entries for {count} frame(s)")
    starts = [first_fragment + off + 8 for off in bot]
    by_start = {offset: index for index, (offset, _) in enumerate(fragments)}
    indices = []
    for start in starts:
        if start not in by_start:
            raise DicomFileError("a Basic Offset Table entry does not point at a fragment")
        indices.append(by_start[start])
    if indices != sorted(indices) or indices[0] != 0:
        raise DicomFileError("Basic Offset Table entries are not increasing")
    bounds = indices + [len(fragments)]
    return tuple(tuple(fragments[bounds[i] : bounds[i + 1]]) for i in range(count))


def _group_by_markers(read_at: ReadAt, fragments: list[Fragment], count: int) -> FrameMap:
    frames: list[list[Fragment]] = []
    for fragment in fragments:
        head = read_at(fragment[0], 4)
        if not frames or head.startswith(_FRAME_STARTS):
            frames.append([fragment])
        else:
            frames[-1].append(fragment)
    if len(frames) != count:
        raise DicomFileError(
            f"cannot tell frame boundaries: {len(fragments)} fragments, {count} frames, and no offset table"
        )
    return tuple(tuple(frame) for frame in frames)


def pack(frames: FrameMap) -> Packed:
    """The registry's compact form: native maps are three numbers whatever the frame count."""
    if all(len(frame) == 1 for frame in frames) and len(frames) > 0:
        first, length = frames[0][0]
        regular = all(frame[0] == (first + i * length, length) for i, frame in enumerate(frames))
        if regular:
            return {"native": [first, length, len(frames)]}
    return {"fragments": [[list(fragment) for fragment in frame] for frame in frames]}


def frame_count(packed: Packed) -> int:
    if "native" in packed:
        return int(packed["native"][2])
    if "decode" in packed:
        return int(packed["decode"][1])
    if "remote" in packed:
        return int(packed["remote"])  # -1 when the source did not say
    return len(packed["fragments"])


def frame_size(packed: Packed, index: int) -> int | None:
    """Bytes in frame ``index`` as served (known before reading, for Content-Length), or None
    for frames of a remote source."""
    if "remote" in packed:
        return None
    if "native" in packed:
        return int(packed["native"][1])
    if "decode" in packed:
        return int(packed["decode"][0])
    return sum(length for _, length in packed["fragments"][index])


def frame_fragments(packed: Packed, index: int) -> tuple[Fragment, ...]:
    """Fragments of frame ``index`` (0-based) without unpacking the whole map: the per-frame path."""
    if "native" in packed:
        first, length, _ = packed["native"]
        return ((first + index * length, length),)
    return tuple((off, length) for off, length in packed["fragments"][index])


def within(fragments: Sequence[Fragment], size: int) -> bool:
    """Whether every fragment lies inside the first ``size`` bytes of a file: checked before a
    read, so a map that disagrees with its file reads nothing it should not."""
    return all(offset >= 0 and length >= 0 and offset + length <= size for offset, length in fragments)
