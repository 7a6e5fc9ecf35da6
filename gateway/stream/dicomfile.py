"""Reading one DICOM file's header and locating its pixel data, for harvest.

Only the header is parsed (pydicom, ``stop_before_pixels``); the Pixel Data element header is then read
by hand to build the frame byte map (``framemap``). Pixel values are never loaded.

How frames are served later depends on the transfer syntax, decided here once per file:

* ``direct``: frames are byte ranges of the file (explicit/implicit VR little endian, encapsulated);
* ``swap``: byte ranges, then byte-swapped to little endian (explicit VR big endian, PS3.5 A.3);
* ``decode``: the file is deflated (PS3.5 A.5); frames need the dataset inflated first.
"""

from __future__ import annotations

import io
import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from gateway.errors import DicomFileError, NotFound
from gateway.stream import framemap

__all__ = ["PixelInfo", "read_header", "frame_of", "bulk_value", "to_little_endian", "MAX_HEADER_BYTES"]

# Real archives hold many slightly invalid values (an IS of "1A", a 65-character UID): index them
# as they are, without one warning per element; values that cannot be converted at all still make
# the file fail with a reason.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# Hostile files: a header larger than this is refused (real headers are a few KiB to a few MiB).
MAX_HEADER_BYTES = 64 * 1024 * 1024
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class PixelInfo:
    """Where an instance's frames are and how to serve them."""

    transfer_syntax: str | None  # None: a remote source that does not say
    mode: str  # "direct" | "swap" | "decode"
    encapsulated: bool
    vr: str  # the Pixel Data VR as stored: OB or OW
    value_offset: int  # first byte of the value (native) or of the first item (encapsulated)
    value_length: int  # bytes of the value; -1 for undefined length
    frames: framemap.Packed | None  # packed frame map, None when frames cannot be located
    frame_error: str | None = None  # why frames cannot be located, for the 5xx message
    swap_width: int = 0  # 2 or 4 for big endian words


def read_header(path: Path | BinaryIO) -> tuple[Dataset, PixelInfo | None]:
    """Parse a file's header (a path, or a seekable file object such as an instance received
    over DIMSE); return the dataset (without Pixel Data) and its pixel info."""
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
    ds = pydicom.dcmread(fp, stop_before_pixels=True)
    if fp.tell() > MAX_HEADER_BYTES:
        raise DicomFileError(f"header larger than {MAX_HEADER_BYTES} bytes")
    pixel = _pixel_info(fp, ds, size)
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
        raise DicomFileError("missing SOPInstanceUID, StudyInstanceUID or SeriesInstanceUID")
    return ds, pixel


def _pixel_info(fp: BinaryIO, ds: Dataset, size: int) -> PixelInfo | None:
    meta = getattr(ds, "file_meta", None)
    ts = UID(str(meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))) if meta else ImplicitVRLittleEndian
    if "Rows" not in ds or "Columns" not in ds:
        return None
    if ts == DeflatedExplicitVRLittleEndian:
        # The file position is inside pydicom's inflated copy, not the file: decode on request.
        frame_len = _frame_length(ds)
        count = _number(ds, "NumberOfFrames", 1) or 1
        vr = "OW" if _number(ds, "BitsAllocated", 16) > 8 else "OB"
        return PixelInfo(str(ts), "decode", False, vr, -1, -1, {"decode": [frame_len, count]})
    position = fp.tell()
    little = ts != ExplicitVRBigEndian
    header = fp.read(12)
    if len(header) < 8:
        return None
    tag = _tag(header[:4], little)
    if tag != _PIXEL_DATA:
        return None
    implicit = ts == ImplicitVRLittleEndian
    if implicit:
        vr = "OW" if _number(ds, "BitsAllocated", 16) > 8 else "OB"
        (length,) = struct.unpack("<I", header[4:8])
        value_offset = position + 8
    else:
        vr = header[4:6].decode("ascii", "replace")
        (length,) = struct.unpack("<I" if little else ">I", header[8:12])
        value_offset = position + 12
    count = _number(ds, "NumberOfFrames", 1) or 1
    encapsulated = length == _UNDEFINED
    frames: framemap.Packed | None = None
    error: str | None = None

    def read_at(offset: int, n: int) -> bytes:
        fp.seek(offset)
        return fp.read(n)

    try:
        if encapsulated:
            extended = _extended_offsets(ds)
            frames = framemap.pack(framemap.encapsulated_map(read_at, value_offset, size, count, extended))
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


def bulk_value(source: Path | bytes, tag_path: str, uid: str) -> bytes:
    """The value of the binary element at ``tag_path`` ('TAG' or 'SEQ/index/TAG...') in a file or
    in a whole instance held in memory. NotFound if there is none; DicomFileError if unreadable."""
    try:
        node: Any = pydicom.dcmread(
            io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True
        )
    except FileNotFoundError:
        raise
    except Exception as exc:  # pydicom's many error types on a changed or broken file
        raise DicomFileError(f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc
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
