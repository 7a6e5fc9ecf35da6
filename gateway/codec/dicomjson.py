"""DICOM JSON (PS3.18 Annex F) straight from the raw elements of a parsed header.

pydicom's ``Dataset.to_json_dict`` converts every element to a Python value first, which costs
~4 ms for a CT header: more than the whole harvest budget (PS3.18 metadata must be ready for
hundreds of instances per second). Here raw bytes become JSON values directly: strings are split on
the delimiter byte and decoded, numbers unpacked with ``struct``. Anything unusual (ISO 2022 or other
multi-byte character sets, ambiguous implicit VRs, invalid values) falls back to pydicom's own
conversion for that one element, so correctness never depends on the fast path.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from typing import Any

from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from gateway.errors import DicomFileError

__all__ = ["dataset_json", "INLINE_LIMIT"]

# Binary values up to this size are inlined as base64 (PS3.18 F.2.7); larger ones become URIs.
INLINE_LIMIT = 1024
MAX_DEPTH = 32  # hostile files: refuse sequences nested deeper than any real IOD

_BINARY = {"OB": 1, "OW": 2, "OF": 4, "OD": 8, "OL": 4, "OV": 8, "UN": 1}
_NUMBERS = {
    "US": ("H", 2),
    "SS": ("h", 2),
    "UL": ("I", 4),
    "SL": ("i", 4),
    "FL": ("f", 4),
    "FD": ("d", 8),
    "SV": ("q", 8),
    "UV": ("Q", 8),
}
_SINGLE_VALUED = {"LT", "ST", "UT", "UR"}  # no backslash splitting (PS3.5 6.2)
_TEXT = {"SH", "LO", "ST", "LT", "UC", "UT", "PN"}  # affected by Specific Character Set
# Character sets where byte 0x5C is always the delimiter, so split-then-decode is exact.
_SIMPLE_CHARSETS = {
    "",
    "ISO_IR 6",
    "ISO_IR 100",
    "ISO_IR 101",
    "ISO_IR 109",
    "ISO_IR 110",
    "ISO_IR 144",
    "ISO_IR 127",
    "ISO_IR 126",
    "ISO_IR 138",
    "ISO_IR 148",
    "ISO_IR 166",
    "ISO_IR 203",
    "ISO_IR 192",
}

BulkURI = Callable[[str], str]


def dataset_json(
    ds: Dataset, bulk_uri: BulkURI, charset: list[str] | None = None, prefix: str = "", depth: int = 0
) -> dict[str, Any]:
    """The DICOM JSON object of ``ds``; ``bulk_uri(tag_path)`` names large binary values."""
    if depth > MAX_DEPTH:
        raise DicomFileError(f"sequences nested deeper than {MAX_DEPTH} levels")
    if charset is None or "SpecificCharacterSet" in ds:
        charset = _charsets(ds)
    encoding = (
        python_encoding.get(charset[0]) if len(charset) == 1 and charset[0] in _SIMPLE_CHARSETS else None
    )
    out: dict[str, Any] = {}
    for tag in ds.keys():
        element = ds.get_item(tag)
        key = _KEYS.get(tag) or _key(tag)
        path = prefix + key
        value = None
        if isinstance(element, RawDataElement):
            value = _fast(element, encoding, bulk_uri, path)
        if value is None:
            value = _slow(ds, tag, bulk_uri, charset, path, depth)
        out[key] = value
    return out


_KEYS: dict[int, str] = {}


def _key(tag: int) -> str:
    key = _KEYS[tag] = f"{int(tag):08X}"
    return key


def _charsets(ds: Dataset) -> list[str]:
    raw = ds.get_item(0x00080005) if "SpecificCharacterSet" in ds else None
    if raw is None:
        return [""]
    value = raw.value if isinstance(raw, (RawDataElement, DataElement)) else raw
    if isinstance(value, bytes):
        names = [v.strip().decode("ascii", "replace") for v in value.split(b"\\")]
    elif isinstance(value, str):
        names = [value]
    else:
        names = [str(v) for v in value]
    return names or [""]


def _fast(
    element: RawDataElement, encoding: str | None, bulk_uri: BulkURI, path: str
) -> dict[str, Any] | None:
    """JSON for one raw element, or None to let pydicom convert it."""
    vr = element.VR
    if vr is None or vr == "UN":
        # Implicit VR, or UN as written: pydicom looks the tag up in its public and private
        # dictionaries and resolves ambiguous VRs ("US or SS") from the rest of the dataset.
        return None
    raw: bytes | None = element.value
    if vr == "SQ":
        return None
    if raw is None or len(raw) == 0:
        return {"vr": vr}
    if vr in _BINARY:
        if len(raw) > INLINE_LIMIT:
            return {"vr": vr, "BulkDataURI": bulk_uri(path)}
        width = _BINARY[vr]
        if not element.is_little_endian and width > 1:
            return None
        return {"vr": vr, "InlineBinary": base64.b64encode(raw).decode("ascii")}
    if vr in _NUMBERS:
        code, size = _NUMBERS[vr]
        if len(raw) % size:
            return None
        order = "<" if element.is_little_endian else ">"
        values = list(struct.unpack(f"{order}{len(raw) // size}{code}", raw))
        if vr in ("FL", "FD") and any(v != v or v in (float("inf"), float("-inf")) for v in values):
            return None  # NaN and infinities have no JSON form
        return {"vr": vr, "Value": values}
    if vr == "AT":
        order = "<" if element.is_little_endian else ">"
        pairs = struct.unpack(f"{order}{len(raw) // 2}H", raw[: len(raw) // 4 * 4])
        return {"vr": vr, "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)]}
    if vr in _TEXT and encoding is None:
        return None  # ISO 2022 or a multi-byte set: pydicom decodes these correctly
    pieces = [raw] if vr in _SINGLE_VALUED else raw.split(b"\\")
    try:
        text = (
            [p.decode(encoding or "ascii") for p in pieces]
            if vr in _TEXT
            else [p.decode("ascii") for p in pieces]
        )
    except UnicodeDecodeError:
        return None
    if vr in _SINGLE_VALUED or vr in ("LT", "ST", "UT"):
        text = [t.rstrip(" \x00") for t in text]
    else:
        text = [t.strip(" \x00") for t in text]
    if not any(text):
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [_person_name(t) for t in text]}
    if vr == "IS":
        try:
            return {"vr": vr, "Value": [int(t) if t else None for t in text]}
        except ValueError:
            return None
    if vr == "DS":
        try:
            return {"vr": vr, "Value": [_decimal(t) if t else None for t in text]}
        except ValueError:
            return None
    return {"vr": vr, "Value": [t if t else None for t in text]}


def _decimal(text: str) -> int | float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _person_name(text: str) -> dict[str, str]:
    """PN component groups (PS3.18 F.2.2); empty groups are left out."""
    groups = text.split("=")
    return {key: group for key, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups) if group}


def _slow(
    ds: Dataset, tag: Any, bulk_uri: BulkURI, charset: list[str], path: str, depth: int
) -> dict[str, Any]:
    element = ds[tag]  # pydicom converts, resolving ambiguous VRs and character sets
    vr = element.VR
    if vr == "SQ":
        items = [
            dataset_json(item, bulk_uri, charset, f"{path}/{index}/", depth + 1)
            for index, item in enumerate(element.value or [])
        ]
        return {"vr": vr, "Value": items} if items else {"vr": vr}
    try:
        return element.to_json_dict(lambda _: bulk_uri(path), INLINE_LIMIT)
    except (ValueError, TypeError, OverflowError):
        return {"vr": vr}  # an invalid value: keep the attribute, drop what cannot be represented
