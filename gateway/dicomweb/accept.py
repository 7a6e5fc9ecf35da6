"""Accept header negotiation for WADO-RS (PS3.18 8.7: Acceptable Media Types and Transfer Syntaxes).

Pure functions: ``parse_accept`` turns the header into media ranges; ``negotiate`` picks the first
offer that the highest-weighted range accepts. An *offer* is one way the gateway can send the
resource without transcoding: a part media type and the transfer syntax its bytes are in.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from gateway.errors import NotAcceptable, RequestError

__all__ = [
    "MediaRange",
    "Offer",
    "parse_accept",
    "negotiate",
    "compressed_media_type",
    "EXPLICIT_LE",
    "IMPLICIT_LE",
    "BIG_ENDIAN",
    "DEFLATED",
    "MAX_ACCEPT_LENGTH",
    "MAX_MEDIA_RANGES",
    "MAX_RANGE_PARAMETERS",
]

# Bounds on an Accept header (a 400 naming the bound past them). A viewer sends one or a few media
# ranges of two or three parameters each; a client listing every transfer syntax, ~25 ranges.
MAX_ACCEPT_LENGTH = 8192  # characters
MAX_MEDIA_RANGES = 64
MAX_RANGE_PARAMETERS = 16  # parameters of one media range, q included

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
UNKNOWN = "*"  # an offer whose syntax the gateway cannot tell: acceptable only to transfer-syntax=*

# PS3.18 Table 8.7.3-5 (media types of compressed bulk data and their transfer syntaxes).
_COMPRESSED = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
# The transfer syntax a media type means when the request names none: the "D" rows of PS3.18
# Tables 8.7.3-4 (uncompressed) and 8.7.3-5 (compressed).
_DEFAULT_SYNTAX = {
    "application/dicom": EXPLICIT_LE,
    "application/octet-stream": EXPLICIT_LE,
    "image/jpeg": "1.2.840.10008.1.2.4.70",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
}


def compressed_media_type(transfer_syntax: str) -> str | None:
    return _COMPRESSED.get(transfer_syntax)


@dataclass(frozen=True)
class MediaRange:
    type: str  # "multipart/related", "*/*", "application/dicom", ...
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0


@dataclass(frozen=True)
class Offer:
    part_type: str  # media type of each part
    transfer_syntax: str


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges by decreasing weight (stable for equal weights); q=0 ranges are dropped."""
    if header is not None and len(header) > MAX_ACCEPT_LENGTH:  # before the cache keeps it
        raise RequestError(f"Accept: at most {MAX_ACCEPT_LENGTH} characters (got {len(header)})")
    return list(_parse_accept(header))


@functools.lru_cache(maxsize=256)  # a viewer sends the same few Accept headers thousands of times
def _parse_accept(header: str | None) -> tuple[MediaRange, ...]:
    if header is None or not header.strip():
        return (MediaRange("*/*"),)
    ranges: list[MediaRange] = []
    items = [item for item in _split(header, ",") if item.strip()]
    if len(items) > MAX_MEDIA_RANGES:
        raise RequestError(f"Accept: at most {MAX_MEDIA_RANGES} media ranges (got {len(items)})")
    for item in items:
        pieces = _split(item, ";")
        media = pieces[0].strip().lower()
        if "/" not in media:
            raise RequestError(f"Accept: {_shown(media)} is not a media type")
        if len(pieces) - 1 > MAX_RANGE_PARAMETERS:
            raise RequestError(f"Accept: at most {MAX_RANGE_PARAMETERS} parameters in a media range")
        params: dict[str, str] = {}
        q = 1.0
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "q":
                q = _weight(value)
            elif name:
                params[name] = value
        if q > 0:
            ranges.append(MediaRange(media, params, q))
    return tuple(sorted(ranges, key=lambda r: -r.q))


def _weight(value: str) -> float:
    """A q parameter: a weight from 0 to 1 (RFC 9110 12.4.2)."""
    try:
        q = float(value)
    except ValueError:
        raise RequestError(f"Accept: q={_shown(value)} is not a number") from None
    if not (math.isfinite(q) and 0 <= q <= 1):
        raise RequestError(f"Accept: q={_shown(value)} is not a weight from 0 to 1")
    return q


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 64 else f"{text[:64]!r}... ({len(text)} characters)"


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes (type="a;b" stays whole)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def negotiate(ranges: list[MediaRange], offers: list[Offer], default_part: str) -> Offer:
    """The offer to send, in the gateway's order of preference among what the best range accepts.

    Only ``multipart/related`` responses are produced (PS3.18 8.7.3.1); ``default_part`` is the
    part type meant by a multipart range without ``type`` (application/dicom for instances,
    application/octet-stream for frames and bulk data)."""
    for media_range in ranges:
        for offer in offers:
            if _accepts(media_range, offer, default_part):
                return offer
    wanted = ", ".join(_describe(r) for r in ranges)
    available = "; ".join(
        f'multipart/related; type="{o.part_type}"; transfer-syntax={o.transfer_syntax}' for o in offers
    )
    raise NotAcceptable(
        f"none of the accepted media types ({wanted}) can be sent without transcoding, which this "
        f"gateway does not do yet; available: {available}"
    )


def _accepts(media_range: MediaRange, offer: Offer, default_part: str) -> bool:
    if media_range.type in ("*/*", "multipart/*"):
        return True
    if media_range.type != "multipart/related":
        return False
    part = media_range.params.get("type", default_part).lower()
    if part not in (offer.part_type, "*/*"):
        return False
    syntax = media_range.params.get("transfer-syntax")
    if syntax is None:
        syntax = _DEFAULT_SYNTAX.get(offer.part_type, EXPLICIT_LE)
    return syntax == "*" or (syntax == offer.transfer_syntax and offer.transfer_syntax != UNKNOWN)


def _describe(media_range: MediaRange) -> str:
    params = "".join(f"; {k}={v}" for k, v in media_range.params.items())
    return media_range.type + params
