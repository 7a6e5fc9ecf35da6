"""Reading one DICOM file's header and locating its pixel data, for harvest.

The header is every element but the pixel data: pydicom parses up to the first pixel element
(``stop_before_pixels``), the pixel element's own header is read by hand to build the frame byte map
(``framemap``) and to find where its value ends, and pydicom parses again from there: private groups
after Pixel Data (7FE1, 8E05 in real files) and trailing padding are part of the header too. Pixel
values are never loaded; a file whose pixel data ends the file (nearly all) costs no extra read.

How frames are served later depends on the transfer syntax, decided here once per file:

* ``direct``: frames are byte ranges of the file (explicit/implicit VR little endian, encapsulated);
* ``swap``: byte ranges, then byte-swapped to little endian (explicit VR big endian, PS3.5 A.3);
* ``decode``: the file is deflated (PS3.5 A.5); frames need the dataset inflated first.

Hostile files are refused with a reason (``DicomFileError``), never read without bound: a header
past ``MAX_HEADER_BYTES`` (before and after the pixel data together), a deflated dataset that
inflates past ``MAX_INFLATED_BYTES``, tables and fragment counts past ``framemap``'s limits.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from array import array
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR

from gateway.codec import framemap
from gateway.errors import DicomFileError, NotFound
from gateway.types import PixelInfo

__all__ = [
    "read_header",
    "frame_of",
    "bulk_value",
    "to_little_endian",
    "MAX_HEADER_BYTES",
    "MAX_INFLATED_BYTES",
]

# Real archives hold many slightly invalid values (an IS of "1A", a 65-character UID): index them
# as they are, without one warning per element; values that cannot be converted at all still make
# the file fail with a reason.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# Hostile files: a header larger than this is refused (real headers are a few KiB to a few MiB).
MAX_HEADER_BYTES = 64 * 1024 * 1024
# pydicom inflates a deflated dataset whole, in memory, before parsing it (and again for each
# frame served): a few kilobytes can inflate to gigabytes. Real deflated files are small (SR, ECG).
MAX_INFLATED_BYTES = 256 * 1024 * 1024
_PIXEL_DATA = 0x7FE00010
# Float and Double Float Pixel Data are pixel data too (pydicom stops before any of the three).
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, _PIXEL_DATA})
_UNDEFINED = 0xFFFFFFFF
_TRAILING_PADDING = 0xFFFCFFFC  # Data Set Trailing Padding: no meaning (PS3.10 7.2), never indexed
_DEFLATED = DeflatedExplicitVRLittleEndian.encode("ascii")
_PEEK = 4096  # bytes read to learn the transfer syntax: a file meta group is ~200 bytes
_LONG_VRS = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
_KNOWN_VRS = frozenset(vr.encode("ascii") for vr in STANDARD_VR)


def read_header(path: Path | BinaryIO) -> tuple[Dataset, PixelInfo | None]:
    """Parse a file's header (a path, or a seekable file object: an instance received over DIMSE,
    a file the folder source opened); return the dataset (every element but pixel data, those
    after it included) and its pixel info."""
    try:
        if isinstance(path, Path | str):
            with open(path, "rb") as fp:
                return _read_header(fp, os.path.getsize(path))
        path.seek(0, os.SEEK_END)
        size = path.tell()
        path.seek(0)
        return _read_header(path, size)
    except DicomFileError:
        raise
    except InvalidDicomError as exc:
        raise DicomFileError(f"not a DICOM file ({exc})") from exc
    except RecursionError as exc:
        raise DicomFileError("sequences nested too deeply") from exc
    except MemoryError as exc:
        raise DicomFileError("an element is too large to read") from exc
    except OSError as exc:
        raise DicomFileError(f"cannot read file ({exc.strerror or exc})") from exc
    except Exception as exc:  # pydicom raises many types on corrupt input; keep the file's reason
        raise DicomFileError(f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc


def _read_header(fp: BinaryIO, size: int) -> tuple[Dataset, PixelInfo | None]:
    if _deflated(fp):
        return _read_deflated(fp)
    fp.seek(0)
    # defer_size: no value larger than a whole header may hold is read into memory; the file is
    # then refused below (its position is past the limit, or past the end of a lying file).
    ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=MAX_HEADER_BYTES)
    head = fp.tell()
    if head > size:
        raise DicomFileError(
            f"truncated: an element's length runs {head - size} bytes past the end of the file"
        )
    if head > MAX_HEADER_BYTES:
        raise DicomFileError(f"header larger than {MAX_HEADER_BYTES} bytes")
    pixel = _read_rest(fp, ds, size, MAX_HEADER_BYTES - head)
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
        raise DicomFileError("missing SOPInstanceUID, StudyInstanceUID or SeriesInstanceUID")
    return ds, pixel


def _syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    return UID(str(meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))) if meta else ImplicitVRLittleEndian


def _encoding(ds: Dataset) -> tuple[bool, bool]:
    """(implicit VR, little endian) as pydicom read the dataset: it switches to implicit VR when
    the data says so whatever the file meta claims, and the pixel element is encoded as the rest."""
    for tag in reversed(list(ds.keys())):  # the last raw element: a converted one has no flags
        element = ds.get_item(tag)
        if isinstance(element, RawDataElement):
            return element.is_implicit_VR, element.is_little_endian
    syntax = _syntax(ds)
    return syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian


def _read_rest(fp: BinaryIO, ds: Dataset, size: int, budget: int) -> PixelInfo | None:
    """From the first pixel element on: its pixel info, and the elements after it added to ``ds``
    (at most ``budget`` bytes of them), as pydicom's full read would hold them."""
    implicit, little = _encoding(ds)
    pixel: PixelInfo | None = None
    after: list[Any] = []  # raw elements, and sequences of undefined length already parsed
    stopped: list[int] = []

    def at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            stopped.append(tag)
            return True
        return False

    position: int | None = fp.tell()
    while position is not None and position < size:
        found, position = _skip_pixels(fp, ds, size, position, implicit, little, pixel is None)
        pixel = pixel or found
        if position is None or position >= size:
            break
        if size - position > budget:
            raise DicomFileError(
                f"{size - position} bytes follow the pixel data: more than a header may hold "
                f"({MAX_HEADER_BYTES} bytes)"
            )
        fp.seek(position)
        stopped.clear()
        # The generator, not read_dataset: no guess at the VR encoding from the first element
        # here (pydicom's full read makes none past the start of the dataset either).
        after += data_element_generator(fp, implicit, little, at_pixels, None, _charset(ds))
        budget -= fp.tell() - position
        if not stopped:
            break  # the end of the file, or a stray delimiter where pydicom's own read stops too
        position = fp.tell()
    # Elements are in increasing tag order (PS3.5 7.1): what follows pixel data in a file is above
    # (7FE0,0010). Anything else there is not an element of this dataset (zero padding reads as
    # (0000,0000) elements) and must not override one read before the pixels (a UID).
    after = [e for e in after if e.tag > _PIXEL_DATA and e.tag != _TRAILING_PADDING]
    if after:
        if pixel is not None and _PIXEL_DATA not in ds:
            # Holds Pixel Data's place, so that the DICOM JSON keeps tag order; the record
            # replaces it with the BulkDataURI of the frames.
            ds[_PIXEL_DATA] = RawDataElement(BaseTag(_PIXEL_DATA), pixel.vr, 0, None, 0, implicit, little)
        for element in after:
            ds[element.tag] = element
    return pixel


def _charset(ds: Dataset) -> Any:
    # What pydicom hands the items of a sequence read after (0008,0005): their text's encoding.
    return ds._character_set


def _skip_pixels(
    fp: BinaryIO, ds: Dataset, size: int, position: int, implicit: bool, little: bool, first: bool
) -> tuple[PixelInfo | None, int | None]:
    """Read the pixel elements' headers at ``position`` (Pixel Data, and Float / Double Float Pixel
    Data): the pixel info of Pixel Data (when ``first``), and where the next element starts (None
    when the value runs past the end of the file: nothing follows that can be read)."""
    pixel: PixelInfo | None = None
    while position < size:
        fp.seek(position)
        header = fp.read(12)
        if len(header) < 8:
            return pixel, None
        tag = _tag(header[:4], little)
        if tag not in _PIXEL_TAGS:
            return pixel, position
        if implicit:
            vr = ("OW" if _number(ds, "BitsAllocated", 16) > 8 else "OB") if tag == _PIXEL_DATA else "OF"
            (length,) = struct.unpack("<I" if little else ">I", header[4:8])
            value_offset = position + 8
        else:
            vr = header[4:6].decode("ascii", "replace")
            if header[4:6] in _LONG_VRS:
                if len(header) < 12:
                    return pixel, None
                (length,) = struct.unpack("<I" if little else ">I", header[8:12])
                value_offset = position + 12
            else:  # a VR with a 2-byte length: pydicom reads it so, and so must we to follow it
                (length,) = struct.unpack("<H" if little else ">H", header[6:8])
                value_offset = position + 8
        items: framemap.Items | None = None
        items_error: str | None = None
        if length == _UNDEFINED:
            try:
                items = framemap.read_items(_reader(fp), value_offset, size)
            except DicomFileError as exc:
                items_error = exc.message
        if tag == _PIXEL_DATA and first:
            pixel = _pixel_info(fp, ds, size, vr, value_offset, length, little, items, items_error)
            first = False
        if items is not None:
            position = items.end
        elif length == _UNDEFINED or value_offset + length > size:
            return pixel, None
        else:
            position = value_offset + length
    return pixel, None


def _reader(fp: BinaryIO) -> framemap.ReadAt:
    def read_at(offset: int, n: int) -> bytes:
        fp.seek(offset)
        return fp.read(n)

    return read_at


def _pixel_info(
    fp: BinaryIO,
    ds: Dataset,
    size: int,
    vr: str,
    value_offset: int,
    length: int,
    little: bool,
    items: framemap.Items | None,
    items_error: str | None,
) -> PixelInfo | None:
    if "Rows" not in ds or "Columns" not in ds:
        return None
    ts = _syntax(ds)
    count = _number(ds, "NumberOfFrames", 1) or 1
    encapsulated = length == _UNDEFINED
    frames: framemap.Packed | None = None
    error: str | None = items_error
    try:
        if ts.is_transfer_syntax and ts.is_encapsulated != encapsulated:
            # A file whose meta lies about its encoding (PS3.5 A.4: encapsulated pixel data goes
            # with a compressed syntax, and only with one): its frames would be sent under a
            # media type they are not in.
            raise DicomFileError(
                f"pixel data is {'' if encapsulated else 'not '}encapsulated, but the transfer syntax "
                f"{ts} says otherwise"
            )
        if encapsulated:
            if items is not None:
                extended = _extended_offsets(ds)
                frames = framemap.pack(
                    framemap.encapsulated_map(_reader(fp), value_offset, size, count, extended, items)
                )
        else:
            if value_offset + length > size:
                raise DicomFileError(
                    f"pixel data is truncated: file ends {value_offset + length - size} bytes early"
                )
            frame_len = _frame_length(ds)
            frames = framemap.pack(framemap.native_map(value_offset, length, frame_len, count))
    except DicomFileError as exc:
        error = exc.message
    bits = _number(ds, "BitsAllocated", 8)
    swap = 0 if little or encapsulated or bits <= 8 else bits // 8
    mode = "swap" if swap else "direct"
    return PixelInfo(
        str(ts), mode, encapsulated, vr, value_offset, -1 if encapsulated else length, frames, error, swap
    )


def _deflated(fp: BinaryIO) -> bool:
    """Whether the dataset is deflated; if so, checked to inflate to at most MAX_INFLATED_BYTES
    before pydicom inflates it whole. The file meta is peeked at by hand (pydicom's own reader
    costs a fifth of a header read); only files that name the deflated syntax, or whose meta the
    peek cannot follow, are read exactly as pydicom will."""
    fp.seek(0)
    head = fp.read(_PEEK)
    syntax = _peek_syntax(head)
    if syntax is not None and syntax != _DEFLATED:
        return False
    from pydicom.filereader import _read_command_set_elements, _read_file_meta_info

    fp.seek(0)
    read_preamble(fp, False)  # InvalidDicomError without the DICM prefix, as dcmread would
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return False
    _read_command_set_elements(fp)  # pydicom reads these before it inflates: start where it will
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    try:
        while chunk := fp.read(1024 * 1024):
            while chunk:
                inflated += len(inflater.decompress(chunk, 1024 * 1024))
                if inflated > MAX_INFLATED_BYTES:
                    raise DicomFileError(f"deflated dataset inflates past {MAX_INFLATED_BYTES} bytes")
                chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise DicomFileError(f"deflated dataset cannot be inflated ({exc})") from exc
    return True


def _peek_syntax(head: bytes) -> bytes | None:
    """The Transfer Syntax UID in the file meta at the start of ``head`` (b"" when the meta has
    none), or None when ``head`` alone cannot tell: no DICM prefix, a meta group that does not end
    within it, an element pydicom might read otherwise (a VR it does not know makes it read the
    whole meta again as implicit VR)."""
    if head[128:132] != b"DICM":
        return None
    position, syntax = 132, b""
    while position + 8 <= len(head):
        group, element, vr = struct.unpack_from("<HH2s", head, position)
        if group != 2:
            return syntax
        if vr not in _KNOWN_VRS:
            return None
        if vr in _LONG_VRS:
            if position + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<I", head, position + 8)
            start = position + 12
        else:
            (length,) = struct.unpack_from("<H", head, position + 6)
            start = position + 8
        if length == _UNDEFINED or start + length > len(head):
            return None
        if element == 0x0010:
            syntax = head[start : start + length].rstrip(b"\x00 ")
        position = start + length
    return None


def _read_deflated(fp: BinaryIO) -> tuple[Dataset, PixelInfo | None]:
    """A deflated file, whole: the file position is inside pydicom's inflated copy, so elements
    after the pixel data can only be had by reading through it (bounded by ``_deflated``). Frames
    are decoded on request."""
    fp.seek(0)
    ds = pydicom.dcmread(fp)
    pixels = ds.get_item(_PIXEL_DATA) if _PIXEL_DATA in ds else None
    for tag in _PIXEL_TAGS:
        if tag in ds:
            del ds[tag]
    for tag in [tag for tag in ds.keys() if tag == _TRAILING_PADDING]:
        del ds[tag]
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
        raise DicomFileError("missing SOPInstanceUID, StudyInstanceUID or SeriesInstanceUID")
    if pixels is None or "Rows" not in ds or "Columns" not in ds:
        return ds, None
    frame_len = _frame_length(ds)
    count = _number(ds, "NumberOfFrames", 1) or 1
    vr = pixels.VR or ("OW" if _number(ds, "BitsAllocated", 16) > 8 else "OB")
    frames = {"decode": [frame_len, count]}
    return ds, PixelInfo(str(DeflatedExplicitVRLittleEndian), "decode", False, vr, -1, -1, frames)


_NUMBER_TAGS = {
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "SamplesPerPixel": (0x00280002, "US"),
    "BitsAllocated": (0x00280100, "US"),
    "NumberOfFrames": (0x00280008, "IS"),
}


def _frame_length(ds: Dataset) -> int:
    return framemap.frame_length(
        _number(ds, "Rows", 0),
        _number(ds, "Columns", 0),
        _number(ds, "SamplesPerPixel", 1),
        _number(ds, "BitsAllocated", 16),
    )


def _number(ds: Dataset, keyword: str, default: int) -> int:
    """An image attribute read from its raw bytes: converting it through pydicom would also
    leave a converted element behind, which the JSON encoder then handles on its slow path."""
    tag, vr = _NUMBER_TAGS[keyword]
    element = ds.get_item(tag) if tag in ds else None
    if element is None:
        return default
    value = element.value
    if isinstance(element, RawDataElement) and isinstance(value, bytes):
        if not value:
            return default
        if vr == "US":
            return int(struct.unpack("<H" if element.is_little_endian else ">H", value[:2])[0])
        text = value.strip(b" \x00").split(b"\\")[0]
        return int(text) if text else default
    return int(value) if value not in (None, "") else default


def _tag(raw: bytes, little: bool) -> int:
    group, element = struct.unpack("<HH" if little else ">HH", raw)
    return (group << 16) | element


def _extended_offsets(ds: Dataset) -> tuple[list[int], list[int]] | None:
    if "ExtendedOffsetTable" not in ds or "ExtendedOffsetTableLengths" not in ds:
        return None
    table, lengths = ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths
    if len(table) % 8 or len(lengths) != len(table):
        raise DicomFileError("Extended Offset Table is malformed")
    n = len(table) // 8
    return list(struct.unpack(f"<{n}Q", table)), list(struct.unpack(f"<{n}Q", lengths))


def frame_of(data: bytes, index: int) -> bytes:
    """Frame ``index`` (0-based) of a whole Part 10 instance held in memory (received over DIMSE),
    little endian, as stored otherwise: the same frame map as for files, read from the buffer."""
    ds, pixel = read_header(io.BytesIO(data))
    if pixel is None or pixel.frames is None:
        raise DicomFileError(pixel.frame_error if pixel and pixel.frame_error else "no pixel data")
    if index >= framemap.frame_count(pixel.frames):
        raise DicomFileError(f"frame {index + 1} does not exist")
    if pixel.mode == "decode":
        full = pydicom.dcmread(io.BytesIO(data))
        length = _frame_length(full)
        return bytes(full.PixelData[index * length : (index + 1) * length])
    frame = b"".join(
        data[offset : offset + length] for offset, length in framemap.frame_fragments(pixel.frames, index)
    )
    return to_little_endian(frame, pixel.swap_width) if pixel.swap_width else frame


def bulk_value(source: Path | bytes | BinaryIO, tag_path: str, uid: str) -> bytes:
    """The value of the binary element at ``tag_path`` ('TAG' or 'SEQ/index/TAG...') in a file (a
    path or an open file) or in a whole instance held in memory, elements after the pixel data
    included. NotFound if there is none; DicomFileError if unreadable."""
    node: Any
    node, _ = read_header(io.BytesIO(source) if isinstance(source, bytes) else source)
    missing = NotFound(f"instance {uid} has no bulk data at {tag_path}")
    try:
        for position, part in enumerate(tag_path.split("/")):
            node = node[int(part)] if position % 2 else node[int(part, 16)].value
    except (KeyError, IndexError, TypeError, ValueError):
        raise missing from None
    if not isinstance(node, bytes):
        raise missing
    return node


def to_little_endian(chunk: bytes, width: int) -> bytes:
    """Big endian words to little endian (PS3.18: web services send little endian frames)."""
    words = array("H" if width == 2 else "I")
    words.frombytes(chunk)
    words.byteswap()
    return words.tobytes()
