"""Instance Availability Notification (PS3.4 Annex R): what a PACS's N-CREATE says, checked before
any of it is used. Pure: the attribute list's bytes in, a ``Notice`` or a ``Refusal`` out.

The attribute list (PS3.4 R.3, the Instance Availability Notification Module of PS3.3)::

    Referenced Performed Procedure Step Sequence (0008,1111)  Type 2: present, zero or one item
    Study Instance UID (0020,000D)                            Type 1
    Referenced Series Sequence (0008,1115)                    Type 1: one or more items
      Series Instance UID (0020,000E)                         Type 1
      Referenced SOP Sequence (0008,1199)                     Type 1: one or more items
        Referenced SOP Class UID (0008,1150)                  Type 1
        Referenced SOP Instance UID (0008,1155)               Type 1
        Instance Availability (0008,0056)                     ONLINE, NEARLINE, OFFLINE, UNAVAILABLE
        Retrieve AE Title (0008,0054)                         Type 1

It is read by pydicom's element reader (``data_element_generator``; sequences and items by its
``read_sequence``), in the two syntaxes the IAN SCP accepts (Implicit and Explicit VR Little
Endian), with what pydicom lets pass refused here: a value or header cut short at the end, an item
tag where an element belongs, more sequence items than a notification of ``MAX_INSTANCES`` holds
(counted in the bytes before reading). The bytes are taken rather than the dataset pynetdicom
decodes (``event.attribute_list``, pydicom's ``read_dataset``): that one would read a list of the
other syntax with a warning, and its faults would surface in the SCP, not here. Values are read
from the bytes as received, never converted by pydicom, so none is validated, warned of or raised
about later, whatever pydicom's ``reading_validation_mode``; what pydicom logs while it reads one
is dropped (``_Quiet``). A malformed list gets the N-CREATE failure status that names the fault
(PS3.7 10.1.5.1.6 and Annex C): 0120 a missing attribute, 0121 a missing value, 0106 an invalid
value, 0213 more than this gateway takes in one notification, 0110 an attribute list that cannot
be read (whatever pydicom raised, sequences nested deeper than Python recurses included).

A notification is only a hint: what gets indexed is what the PACS's C-FIND answers for the study or
series it names (``Notice.paths``), never what the notification says. UIDs are checked (PS3.5 9.1)
before they become paths: a UID key of ``*`` would be a wildcard to some PACS.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

__all__ = [
    "INSTANCE_AVAILABILITY",
    "Notice",
    "Refusal",
    "parse_notice",
    "valid_uid",
    "MAX_SERIES",
    "MAX_INSTANCES",
    "SERIES_PATHS",
]

INSTANCE_AVAILABILITY = "1.2.840.10008.5.1.4.33"  # the SOP Class (PS3.4 R.4, PS3.6 Annex A)

# One notification usually names one study's new instances (dcm4chee sends one per study or per
# performed procedure step). The largest studies hold a few thousand instances (a breast
# tomosynthesis or whole-body study): 20,000 with room to spare, read in about a second.
MAX_SERIES = 1000
MAX_INSTANCES = 20_000
# Up to this many series are harvested series by series (a C-FIND each); more, the whole study.
SERIES_PATHS = 16

# N-CREATE failure statuses (PS3.7 Annex C, C.4; PS3.7 10.1.5.1.6).
INVALID_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
MISSING_ATTRIBUTE = 0x0120
MISSING_VALUE = 0x0121
RESOURCE_LIMITATION = 0x0213

AVAILABILITY = frozenset({"ONLINE", "NEARLINE", "OFFLINE", "UNAVAILABLE"})  # its defined terms

_STUDY_UID = BaseTag(0x0020000D)
_SERIES_UID = BaseTag(0x0020000E)
_PPS_SEQUENCE = BaseTag(0x00081111)
_SERIES_SEQUENCE = BaseTag(0x00081115)
_SOP_SEQUENCE = BaseTag(0x00081199)
_SOP_CLASS = BaseTag(0x00081150)
_SOP_INSTANCE = BaseTag(0x00081155)
_AVAILABILITY = BaseTag(0x00080056)
_RETRIEVE_AE = BaseTag(0x00080054)

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # PS3.5 9.1: digits, no leading zero


def valid_uid(value: str) -> bool:
    """Whether ``value`` is a UID as PS3.5 9.1 spells it: components of digits separated by
    periods, no leading zero in a component, at most 64 characters."""
    return len(value) <= 64 and value.isascii() and _UID.fullmatch(value) is not None


@dataclass(frozen=True)
class Notice:
    """What an accepted notification names: one study, the series in it with instances now
    available (or not), and how many instances it referenced."""

    StudyInstanceUID: str
    series: frozenset[str]  # Series Instance UIDs
    instances: int
    unavailable: int  # of them, said UNAVAILABLE: the study is harvested anyway

    def paths(self) -> set[str]:
        """Where to harvest, as the DIMSE source names its entries: each series named, or the
        whole study when it names many (one C-FIND lists them all)."""
        study = f"/studies/{self.StudyInstanceUID}"
        if len(self.series) > SERIES_PATHS:
            return {study}
        return {f"{study}/series/{uid}" for uid in self.series}


@dataclass(frozen=True)
class Refusal:
    """A notification refused: its N-CREATE status and why (for the log)."""

    status: int
    reason: str


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.refusal = Refusal(status, reason)


def parse_notice(data: bytes, explicit: bool) -> Notice | Refusal:
    """The notification in an N-CREATE's attribute list ``data``, encoded in Explicit
    (``explicit``) or Implicit VR Little Endian, or why it is refused."""
    # Every item header holds the Item tag's bytes: counting them bounds what pydicom reads (an
    # 8 MiB list of empty items would be a million datasets) before it reads anything. A value
    # holding those bytes by chance counts too: no value of this module does.
    if data.count(_ITEM_TAG) > _ITEMS:
        return Refusal(RESOURCE_LIMITATION, f"more than {_ITEMS} sequence items")
    _parsing.active = True
    try:
        return _notice(_read(data, explicit))
    except _Refused as refused:
        return refused.refusal
    except RecursionError:  # sequences in items in sequences..., deeper than Python recurses
        return Refusal(PROCESSING_FAILURE, "the attribute list cannot be read: sequences nested too deeply")
    except Exception as exc:  # pydicom raises many types (OSError, EOFError, struct.error...)
        why = f"{type(exc).__name__}: {exc}"[:200]
        return Refusal(PROCESSING_FAILURE, f"the attribute list cannot be read: {why}")
    finally:
        _parsing.active = False


# -- reading the attribute list (PS3.5 7.1 data elements, 7.5 nesting) -----------------------------

_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) in Little Endian, the same in both syntaxes
_UNDEFINED = 0xFFFFFFFF
_ITEMS = MAX_INSTANCES + MAX_SERIES + 64  # items read in all, whatever their nesting


class _Quiet(logging.Filter):
    """Drops pydicom's records while this thread reads a notification: what pydicom would say of
    a malformed one (an unknown character set in each of 20,000 items, say) is said once, as the
    refusal's reason or not at all. Other threads' records pass (the gateway reads files while
    notifications arrive)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_parsing, "active", False)


_parsing = threading.local()
logging.getLogger("pydicom").addFilter(_Quiet())


def _broken(why: str) -> _Refused:
    return _Refused(PROCESSING_FAILURE, f"the attribute list cannot be read: {why}")


def _read(data: bytes, explicit: bool) -> Dataset:
    """The top-level elements, read by pydicom's element reader. Driven here rather than by
    ``read_dataset``, which would read a list of the other syntax than the one negotiated (and
    warn), pass over a header cut short at the end, and take an item tag for an element.
    Sequences of undefined length are read now, items and all; those of defined length when their
    value is first asked for (``_sequence``)."""
    fp = BytesIO(data)
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    reader = data_element_generator(fp, is_implicit_VR=not explicit, is_little_endian=True)
    while True:
        offset = fp.tell()
        element = next(reader, None)
        if element is None:
            break
        if element.tag >> 16 == 0xFFFE:  # an item or delimiter tag (PS3.5 7.5)
            raise _broken(f"an item tag where an element belongs, at byte {offset}")
        _whole(element)
        elements[element.tag] = element
    if offset != len(data):  # pydicom stops at a header cut short, or an item delimiter
        raise _broken(f"no element at byte {offset}")
    return Dataset(elements)


def _whole(element: RawDataElement | DataElement) -> None:
    """Refuse a value cut short: pydicom keeps the bytes there are past the end."""
    if isinstance(element, RawDataElement) and element.length != _UNDEFINED:
        if len(element.value or b"") != element.length:
            raise _broken(f"element {element.tag} runs past the end")


# -- checking what it says ---------------------------------------------------------------------------

_NAMES = {
    _STUDY_UID: "Study Instance UID (0020,000D)",
    _SERIES_UID: "Series Instance UID (0020,000E)",
    _PPS_SEQUENCE: "Referenced Performed Procedure Step Sequence (0008,1111)",
    _SERIES_SEQUENCE: "Referenced Series Sequence (0008,1115)",
    _SOP_SEQUENCE: "Referenced SOP Sequence (0008,1199)",
    _SOP_CLASS: "Referenced SOP Class UID (0008,1150)",
    _SOP_INSTANCE: "Referenced SOP Instance UID (0008,1155)",
    _AVAILABILITY: "Instance Availability (0008,0056)",
    _RETRIEVE_AE: "Retrieve AE Title (0008,0054)",
}


def _notice(top: Dataset) -> Notice:
    steps = _sequence(top, _PPS_SEQUENCE, empty=True)
    if len(steps) > 1:
        raise _Refused(INVALID_VALUE, f"{_NAMES[_PPS_SEQUENCE]} holds {len(steps)} items, at most one")
    for step in steps:
        _uid(step, _SOP_CLASS)
        _uid(step, _SOP_INSTANCE)
    study = _uid(top, _STUDY_UID)
    series_items = _sequence(top, _SERIES_SEQUENCE)
    if len(series_items) > MAX_SERIES:
        raise _Refused(RESOURCE_LIMITATION, f"{len(series_items)} series, more than the {MAX_SERIES} taken")
    series: set[str] = set()
    instances = unavailable = 0
    for item in series_items:
        series.add(_uid(item, _SERIES_UID))
        for sop in _sequence(item, _SOP_SEQUENCE):
            instances += 1
            if instances > MAX_INSTANCES:
                raise _Refused(RESOURCE_LIMITATION, f"more than the {MAX_INSTANCES} instances taken")
            _uid(sop, _SOP_CLASS)
            _uid(sop, _SOP_INSTANCE)
            availability = _text(sop, _AVAILABILITY)
            if availability not in AVAILABILITY:
                raise _Refused(
                    INVALID_VALUE,
                    f"{_NAMES[_AVAILABILITY]} {availability!r} is not one of {sorted(AVAILABILITY)}",
                )
            unavailable += availability == "UNAVAILABLE"
            for title in _text(sop, _RETRIEVE_AE).split("\\"):  # VM 1-n
                if not 0 < len(title.strip(" ")) <= 16:
                    raise _Refused(INVALID_VALUE, f"{_NAMES[_RETRIEVE_AE]} {title!r} is not an AE title")
    return Notice(study, frozenset(series), instances, unavailable)


def _element(ds: Dataset, tag: BaseTag) -> RawDataElement | DataElement:
    # As read: its value not converted, so never validated or warned of (whatever pydicom's
    # reading_validation_mode), and an empty one not converted either (keep_deferred).
    element = ds.get_item(tag, keep_deferred=True)
    if element is None:
        raise _Refused(MISSING_ATTRIBUTE, f"no {_NAMES[tag]}")
    _whole(element)
    return element


def _sequence(ds: Dataset, tag: BaseTag, empty: bool = False) -> list[Dataset]:
    element = _element(ds, tag)
    if element.VR in (None, "SQ", "UN"):  # implicit VR, or a sequence in implicit VR (PS3.5 6.2.2)
        items = ds[tag].value  # a sequence of defined length: pydicom reads its items now
    else:
        items = element.value
    if not isinstance(items, Sequence):
        if items:  # a non-empty value that is not a sequence
            raise _Refused(INVALID_VALUE, f"{_NAMES[tag]} is not a sequence")
        items = Sequence()  # an empty value of another VR
    if not items and not empty:
        raise _Refused(MISSING_VALUE, f"{_NAMES[tag]} is empty")
    return list(items)


def _text(ds: Dataset, tag: BaseTag) -> str:
    """A value in the default repertoire (UI, CS, AE), its padding removed: read from its bytes,
    whatever Specific Character Set says (these VRs use the default repertoire, PS3.5 6.2)."""
    element = _element(ds, tag)
    value = element.value or b""  # an empty value is read as None, "" or b"", by VR
    if element.VR == "SQ" or isinstance(value, Sequence):
        raise _Refused(INVALID_VALUE, f"{_NAMES[tag]} is a sequence")
    if not isinstance(value, bytes):
        raise _Refused(INVALID_VALUE, f"{_NAMES[tag]} is not a text value")
    text = value.rstrip(b"\0 ").lstrip(b" ")
    if not text:
        raise _Refused(MISSING_VALUE, f"{_NAMES[tag]} is empty")
    if not (text.isascii() and text.decode("ascii").isprintable()):
        raise _Refused(INVALID_VALUE, f"{_NAMES[tag]} is not in the default character repertoire")
    return text.decode("ascii")


def _uid(ds: Dataset, tag: BaseTag) -> str:
    value = _text(ds, tag)
    if not valid_uid(value):
        raise _Refused(INVALID_VALUE, f"{_NAMES[tag]} {value[:70]!r} is not a UID (PS3.5 9.1)")
    return value
