"""Value types shared by every layer: what a source holds, where an instance lies, how its frames
are laid out, which studies a caller may see, what a search asks (``Query``: parsed from the query
string by ``gateway.dicomweb.query``, compiled to SQL by ``gateway.registry.qido``), and the small
vocabularies these use.

This module sits at the bottom of the package (it imports nothing of the gateway), so the codecs,
the registry, the sources, the access policy and the HTTP layer can all speak of the same things
without importing each other (starlette's ``types.py`` plays the same part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = [
    "Level",
    "MatchKind",
    "PixelMode",
    "SourceKind",
    "ChangeKind",
    "Change",
    "Packed",
    "PixelInfo",
    "Entry",
    "Location",
    "InstanceFile",
    "Restriction",
    "Match",
    "Query",
]

Level = Literal["study", "series", "instance"]  # QIDO and WADO levels (PS3.18 10.6, 10.4)
# How a matching key's value is compared (PS3.4 C.2.2.2): single value, wildcard, UID list, range,
# universal (an empty value: return the attribute, match everything).
MatchKind = Literal["single", "wildcard", "list", "range", "universal"]
# How an instance's frames are served: bytes as stored, byte-swapped big endian words, decoded
# (deflated files), or fetched from a remote source by number.
PixelMode = Literal["direct", "swap", "decode", "remote"]
SourceKind = Literal["filesystem", "dicomweb", "dimse"]
# What the change feed records (README, "Change feed"): what each harvest wrote or removed, per
# series, as it commits; and per study, once no instance has arrived for the quiet period, that it
# became available (first time), was updated (later times) or was removed (its last instance gone).
ChangeKind = Literal[
    "instances.added", "instances.removed", "study.available", "study.updated", "study.removed"
]

Packed = dict[str, Any]  # a frame map in the registry's JSON form (see ``gateway.codec.framemap``)


@dataclass(frozen=True)
class PixelInfo:
    """Where an instance's frames are and how to serve them."""

    transfer_syntax: str | None  # None: a remote source that does not say
    mode: str  # a PixelMode: "direct" | "swap" | "decode"
    encapsulated: bool
    vr: str  # the Pixel Data VR as stored: OB or OW
    value_offset: int  # first byte of the value (native) or of the first item (encapsulated)
    value_length: int  # bytes of the value; -1 for undefined length
    frames: Packed | None  # packed frame map, None when frames cannot be located
    frame_error: str | None = None  # why frames cannot be located, for the 5xx message
    swap_width: int = 0  # 2 or 4 for big endian words


@dataclass(frozen=True)
class Entry:
    """One object a source holds, with what tells whether it changed since the last harvest."""

    path: str
    size: int
    mtime_ns: int
    # Remote sources list instances with their DICOM JSON already in hand (a series' /metadata):
    # (body, pixel info), so harvest builds the record without reading anything else.
    prepared: tuple[dict[str, Any], PixelInfo | None] | None = field(default=None, compare=False)
    # Why the source will not read this entry (a folder's FIFO, a link out of the folder, a directory
    # too deep to walk): ``read_header`` refuses it with this reason, so harvest counts, logs and
    # remembers it like any unreadable file, until its size or time changes.
    refused: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Location:
    """Where one instance can be read, and how its frames are laid out."""

    source: str
    path: str
    size: int
    SOPInstanceUID: str
    SeriesInstanceUID: str
    StudyInstanceUID: str
    TransferSyntaxUID: str | None
    mode: str | None  # a PixelMode; None for an instance without pixel data
    encapsulated: bool
    frames: Packed | None
    frame_error: str | None
    swap: int
    SOPClassUID: str | None = None
    # When the indexed file was last modified (a folder's), with ``size`` what it must still be
    # before a byte of it is served; None for remote sources.
    mtime_ns: int | None = None


class InstanceFile(NamedTuple):
    """Where one instance's whole Part 10 file can be read."""

    source: str
    path: str
    size: int  # bytes of the stored file; for remote sources, a change token (see ``remote``)
    TransferSyntaxUID: str | None
    SOPInstanceUID: str
    mode: str | None = None
    SOPClassUID: str | None = None
    mtime_ns: int | None = None  # as ``Location.mtime_ns``

    @property
    def remote(self) -> bool:
        return self.mode == "remote"


@dataclass(frozen=True)
class Restriction:
    """Which studies a caller may see, decided by the access policy (``gateway.access.policy``);
    the registry only applies it. ``None`` leaves that dimension open."""

    patients: frozenset[str] | None = None  # INS of the patients whose studies are visible
    studies: frozenset[str] | None = None  # the only visible studies (a study link)
    hidden: frozenset[str] = frozenset()  # studies hidden by their patient


@dataclass(frozen=True)
class Match:
    """One matching key of a search (PS3.4 C.2.2.2), by DICOM keyword; ``values`` as the kind
    needs them: one value or pattern, the list's values, a range's (low, high) with "" for an open
    end, none for universal matching."""

    keyword: str
    kind: MatchKind
    values: tuple[str, ...]


@dataclass(frozen=True)
class Query:
    """A QIDO-RS search (PS3.18 10.6): what ``gateway.dicomweb.query.parse_qido`` made of the
    query string, the UIDs of the path, and what the caller may see."""

    level: Level
    matches: tuple[Match, ...] = ()
    includefields: tuple[str, ...] = ()  # DICOM keywords, in the order first asked
    include_all: bool = False  # includefield=all
    fuzzy: bool = False  # fuzzymatching=true
    limit: int | None = None  # None: not given (the registry answers at most its own page)
    offset: int = 0
    scope: dict[str, str] = field(default_factory=dict)  # UIDs from the path, by keyword
    restriction: Restriction | None = None  # None: the caller sees every study


@dataclass(frozen=True)
class Change:
    """One event of the change feed, in the order of ``seq`` (monotonic; numbers may be skipped,
    never reordered: see ``gateway.registry.changes``)."""

    seq: int
    time: float  # seconds since the epoch, when the event was written
    kind: str  # a ChangeKind
    source: str  # the source whose harvest wrote it ("" for study-level events)
    StudyInstanceUID: str
    SeriesInstanceUID: str | None  # None for study-level events
    patient: str | None  # the patient's INS, when the study has one
    instances: int  # instances added or removed (series events); the study's count (study events)
