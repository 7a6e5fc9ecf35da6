"""Instance Availability Notification attribute lists (PS3.4 Annex R) read and checked without a
socket: a catalogue of notifications, each encoded in both syntaxes the SCP accepts, with the
N-CREATE status each must get (PS3.7 10.1.5.1.6, Annex C)."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from gateway.stream.dimse.ian import (
    MAX_INSTANCES,
    MAX_SERIES,
    SERIES_PATHS,
    Notice,
    Refusal,
    parse_notice,
    valid_uid,
)

STUDY = "1.2.826.0.1.3680043.8.498.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def sop(uid: str, availability: str = "ONLINE", ae: str = "DCM4CHEE") -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = uid
    item.InstanceAvailability = availability
    item.RetrieveAETitle = ae
    return item


def series(uid: str, instances: int = 2) -> Dataset:
    item = Dataset()
    item.SeriesInstanceUID = uid
    item.ReferencedSOPSequence = [sop(f"{uid}.{n}") for n in range(1, instances + 1)]
    return item


def notification(n_series: int = 1, instances: int = 2) -> Dataset:
    ds = Dataset()
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.StudyInstanceUID = STUDY
    ds.ReferencedSeriesSequence = [series(f"{STUDY}.{n}", instances) for n in range(1, n_series + 1)]
    return ds


def encode(ds: Dataset, explicit: bool, undefined: bool = False) -> bytes:
    if undefined:  # sequences and items of undefined length, as many SCUs write them
        for element in ds.iterall():
            if element.VR == "SQ":
                element.is_undefined_length = True
                for item in element.value:
                    item.is_undefined_length_sequence_item = True
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, not explicit
    write_dataset(fp, ds)
    return fp.getvalue()


ENCODINGS = [(True, False), (False, False), (True, True), (False, True)]
ENCODING_IDS = ["explicit", "implicit", "explicit-undefined", "implicit-undefined"]


@pytest.mark.parametrize("explicit,undefined", ENCODINGS, ids=ENCODING_IDS)
def test_a_well_formed_notification_names_its_study_and_series(explicit, undefined):
    notice = parse_notice(encode(notification(n_series=2), explicit, undefined), explicit)
    assert notice == Notice(STUDY, frozenset({f"{STUDY}.1", f"{STUDY}.2"}), 4, 0)
    assert notice.paths() == {f"/studies/{STUDY}/series/{STUDY}.1", f"/studies/{STUDY}/series/{STUDY}.2"}


def test_a_performed_procedure_step_reference_is_taken():
    ds = notification()
    step = Dataset()
    step.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
    step.ReferencedSOPInstanceUID = "1.2.3.4"
    step.PerformedWorkitemCodeSequence = []
    ds.ReferencedPerformedProcedureStepSequence = [step]
    assert isinstance(parse_notice(encode(ds, True), True), Notice)


def test_unavailable_instances_are_counted_and_the_study_still_harvested():
    ds = notification(instances=1)
    ds.ReferencedSeriesSequence[0].ReferencedSOPSequence.append(sop("1.2.3.9", "UNAVAILABLE"))
    notice = parse_notice(encode(ds, True), True)
    assert isinstance(notice, Notice) and (notice.instances, notice.unavailable) == (2, 1)
    assert notice.paths()


def test_many_series_are_harvested_as_the_whole_study():
    notice = parse_notice(encode(notification(n_series=SERIES_PATHS + 1, instances=1), True), True)
    assert isinstance(notice, Notice) and notice.paths() == {f"/studies/{STUDY}"}


def drop(keyword: str, where: Callable[[Dataset], Dataset] = lambda ds: ds) -> Callable[[Dataset], None]:
    return lambda ds: delattr(where(ds), keyword)


def put(
    keyword: str, value, where: Callable[[Dataset], Dataset] = lambda ds: ds
) -> Callable[[Dataset], None]:
    return lambda ds: setattr(where(ds), keyword, value)


def first_series(ds: Dataset) -> Dataset:
    return ds.ReferencedSeriesSequence[0]


def first_sop(ds: Dataset) -> Dataset:
    return ds.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]


def two_steps(ds: Dataset) -> None:
    step = Dataset()
    step.ReferencedSOPClassUID, step.ReferencedSOPInstanceUID = "1.2.3", "1.2.4"
    ds.ReferencedPerformedProcedureStepSequence = [step, step]


# (change to a good notification, N-CREATE status, words of the reason)
MALFORMED = {
    "no-study-uid": (drop("StudyInstanceUID"), 0x0120, "Study Instance UID"),
    "empty-study-uid": (put("StudyInstanceUID", ""), 0x0121, "Study Instance UID"),
    "wildcard-study-uid": (put("StudyInstanceUID", "*"), 0x0106, "not a UID"),
    "leading-zero-uid": (put("StudyInstanceUID", "1.02.3"), 0x0106, "not a UID"),
    "long-uid": (put("StudyInstanceUID", "1." + "2" * 63), 0x0106, "not a UID"),
    "path-in-uid": (put("StudyInstanceUID", "1.2/../3"), 0x0106, "not a UID"),
    "no-step-sequence": (drop("ReferencedPerformedProcedureStepSequence"), 0x0120, "Performed Procedure"),
    "two-steps": (two_steps, 0x0106, "at most one"),
    "no-series-sequence": (drop("ReferencedSeriesSequence"), 0x0120, "Referenced Series Sequence"),
    "empty-series-sequence": (put("ReferencedSeriesSequence", []), 0x0121, "Referenced Series Sequence"),
    "no-series-uid": (drop("SeriesInstanceUID", first_series), 0x0120, "Series Instance UID"),
    "bad-series-uid": (put("SeriesInstanceUID", "1.2.x", first_series), 0x0106, "Series Instance UID"),
    "no-sop-sequence": (drop("ReferencedSOPSequence", first_series), 0x0120, "Referenced SOP Sequence"),
    "empty-sop-sequence": (put("ReferencedSOPSequence", [], first_series), 0x0121, "Referenced SOP Sequence"),
    "no-sop-class": (drop("ReferencedSOPClassUID", first_sop), 0x0120, "Referenced SOP Class UID"),
    "bad-sop-instance": (
        put("ReferencedSOPInstanceUID", "abc", first_sop),
        0x0106,
        "Referenced SOP Instance",
    ),
    "no-availability": (drop("InstanceAvailability", first_sop), 0x0120, "Instance Availability"),
    "bad-availability": (put("InstanceAvailability", "LOST", first_sop), 0x0106, "Instance Availability"),
    "no-retrieve-ae": (drop("RetrieveAETitle", first_sop), 0x0120, "Retrieve AE Title"),
    "empty-retrieve-ae": (put("RetrieveAETitle", "", first_sop), 0x0121, "Retrieve AE Title"),
    "long-retrieve-ae": (put("RetrieveAETitle", ["OK", "A" * 17], first_sop), 0x0106, "Retrieve AE Title"),
}


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "implicit"])
@pytest.mark.parametrize("change,status,words", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_notification_gets_the_status_naming_its_fault(change, status, words, explicit):
    ds = notification()
    change(ds)
    refusal = parse_notice(encode(ds, explicit), explicit)
    assert isinstance(refusal, Refusal), refusal
    assert refusal.status == status and words in refusal.reason, refusal


def test_a_uid_sent_as_a_sequence_is_an_invalid_value():
    ds = notification()
    ds[0x0020000D] = DataElement(0x0020000D, "SQ", Sequence([Dataset()]))
    refusal = parse_notice(encode(ds, True), True)
    assert isinstance(refusal, Refusal) and refusal.status == 0x0106 and "is a sequence" in refusal.reason


def test_more_instances_than_taken_is_a_resource_limitation():
    refusal = parse_notice(encode(notification(n_series=2, instances=MAX_INSTANCES // 2 + 1), True), True)
    assert isinstance(refusal, Refusal) and refusal.status == 0x0213


def test_more_series_than_taken_is_a_resource_limitation():
    ds = notification(n_series=1, instances=1)
    ds.ReferencedSeriesSequence = [series(f"{STUDY}.{n}", 1) for n in range(MAX_SERIES + 1)]
    refusal = parse_notice(encode(ds, True), True)
    assert isinstance(refusal, Refusal) and refusal.status == 0x0213


def element(group: int, elem: int, value: bytes, vr: bytes | None = None) -> bytes:
    if vr is None:
        return struct.pack("<HHL", group, elem, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


ITEM, UNDEFINED = struct.pack("<HH", 0xFFFE, 0xE000), 0xFFFFFFFF
GOOD = encode(notification(), False)

# Encodings that cannot be read at all: Processing Failure, whatever they claim.
UNREADABLE = {
    "truncated": GOOD[:-5],
    "length-past-end": element(0x0020, 0x000D, b"1.2.3\0") + struct.pack("<HHL", 0x0008, 0x0056, 1 << 30),
    "header-cut": GOOD + b"\x08\x00",
    "undefined-sequence-unterminated": struct.pack("<HHL", 0x0008, 0x1115, UNDEFINED)
    + ITEM
    + struct.pack("<L", 0),
    "item-unterminated": struct.pack("<HHL", 0x0008, 0x1115, UNDEFINED) + ITEM + struct.pack("<L", UNDEFINED),
    "not-an-item": struct.pack("<HHL", 0x0008, 0x1115, 8) + element(0x0020, 0x000E, b"1."),
    "item-tag-at-top": ITEM + struct.pack("<L", 0),
    "nested-too-deep": struct.pack("<HHL", 0x0008, 0x1115, UNDEFINED)
    + (ITEM + struct.pack("<L", UNDEFINED) + struct.pack("<HHL", 0x0008, 0x1199, UNDEFINED)) * 50,
}


@pytest.mark.parametrize("data", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_an_unreadable_attribute_list_is_a_processing_failure(data):
    refusal = parse_notice(data, False)
    assert isinstance(refusal, Refusal) and refusal.status == 0x0110, refusal


def test_explicit_vr_garbage_where_a_vr_belongs_is_a_processing_failure():
    refusal = parse_notice(struct.pack("<HH", 0x0020, 0x000D) + b"\x00\x01\x06\x00" + b"1.2.3\0", True)
    assert isinstance(refusal, Refusal) and refusal.status == 0x0110


def test_an_empty_attribute_list_is_missing_its_attributes():
    refusal = parse_notice(b"", True)
    assert isinstance(refusal, Refusal) and refusal.status == 0x0120


def test_elements_it_does_not_know_are_passed_over():
    ds = notification()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Hélène"
    ds.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].RetrieveURL = "https://pacs.example/wado"
    for explicit in (True, False):
        assert isinstance(parse_notice(encode(ds, explicit, undefined=True), explicit), Notice)


@pytest.mark.parametrize(
    "uid,valid",
    [
        ("1.2.840.10008.1.2", True),
        ("0", True),
        ("2.25.329800735698586629295641978511506172918", True),
        ("1." + "2" * 62, True),  # 64 characters
        ("1." + "2" * 63, False),
        ("", False),
        ("1..2", False),
        (".1.2", False),
        ("1.2.", False),
        ("1.02", False),
        ("1.2.a", False),
        ("1.2 ", False),
        ("١.٢", False),  # digits, not ASCII ones
        ("*", False),
    ],
)
def test_uids_are_checked_as_ps3_5_spells_them(uid, valid):
    assert valid_uid(uid) is valid


def test_more_sequence_items_than_a_notification_holds_is_refused_before_reading():
    empty_items = (ITEM + struct.pack("<L", 0)) * (MAX_INSTANCES + MAX_SERIES + 65)
    data = (
        struct.pack("<HHL", 0x0008, 0x1115, UNDEFINED) + empty_items + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )
    refusal = parse_notice(data, False)
    assert isinstance(refusal, Refusal) and refusal.status == 0x0213, refusal


def test_sequences_nested_deeper_than_python_recurses_are_a_processing_failure():
    levels = 5000  # each one a well-formed item of undefined length holding the next sequence
    opened = ITEM + struct.pack("<L", UNDEFINED) + struct.pack("<HHL", 0x0008, 0x1199, UNDEFINED)
    closed = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    data = struct.pack("<HHL", 0x0008, 0x1115, UNDEFINED) + opened * levels + closed * levels
    refusal = parse_notice(data + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0), False)
    assert isinstance(refusal, Refusal) and refusal.status == 0x0110, refusal


# As the gateway runs (pydicom's warnings shown once, not raised): what pydicom logs is dropped.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_what_pydicom_logs_while_reading_a_notification_is_dropped(caplog):
    ds = notification(instances=50)
    for item in ds.ReferencedSeriesSequence[0].ReferencedSOPSequence:
        item.SpecificCharacterSet = "NO_SUCH_CHARSET"  # pydicom logs it once per item read
    lists = {explicit: encode(ds, explicit, undefined=True) for explicit in (True, False)}
    caplog.clear()  # what pydicom said writing them
    with caplog.at_level(logging.WARNING, logger="pydicom"):
        for explicit, data in lists.items():
            assert isinstance(parse_notice(data, explicit), Notice)
        assert not [r for r in caplog.records if r.name == "pydicom"]
        logging.getLogger("pydicom").warning("said outside a notification")
    assert [r.message for r in caplog.records if r.name == "pydicom"] == ["said outside a notification"]
