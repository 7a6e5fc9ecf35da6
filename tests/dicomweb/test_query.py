"""The QIDO-RS query parser alone (PS3.18 8.3.4, 10.6.1; PS3.4 C.2.2.2): query strings in, a
``Query`` or a 400 out. No registry, no HTTP: ``parse_qido`` is given the (name, value) pairs that a
framework decodes from the query string."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
from starlette.datastructures import QueryParams

from gateway.codec.attributes import COMPUTED, DEFAULTS, LEVEL_COLUMNS
from gateway.dicomweb.query import (
    MAX_FUZZY_WORDS,
    MAX_INCLUDEFIELDS,
    MAX_LIMIT,
    MAX_LIST,
    MAX_OFFSET,
    MAX_VALUE_LENGTH,
    parse_qido,
    returned,
)
from gateway.errors import QueryError
from gateway.types import Match, Query, Restriction

STUDY = "1.2.826.0.1.3680043.2.1125.1"
SERIES = "1.2.826.0.1.3680043.2.1125.1.2"


def parsed(text: str, level: str = "study", scope: dict[str, str] | None = None) -> Query:
    """``text`` as a framework hands it over: percent-decoded pairs, repeats and blanks kept."""
    return parse_qido(parse_qsl(text, keep_blank_values=True), level, scope)


def single(keyword: str, value: str) -> Match:
    return Match(keyword, "single", (value,))


# (id, query string, level, scope, the Query expected)
PARSED = [
    ("nothing", "", "study", None, Query("study")),
    ("keyword", "PatientID=P1", "study", None, Query("study", (single("PatientID", "P1"),))),
    ("tag", "00100020=P1", "study", None, Query("study", (single("PatientID", "P1"),))),
    ("tag-lower-case-hex", "0008103e=CHEST", "series", None,
     Query("series", (single("SeriesDescription", "CHEST"),))),
    ("keys-in-the-order-given", "StudyDate=20240101&00100020=P1", "study", None,
     Query("study", (single("StudyDate", "20240101"), single("PatientID", "P1")))),
    ("level-above-at-series", "PatientName=DOE&Modality=CT", "series", None,
     Query("series", (single("PatientName", "DOE"), single("Modality", "CT")))),
    ("uid-list-comma", f"StudyInstanceUID={STUDY},1.2.3", "study", None,
     Query("study", (Match("StudyInstanceUID", "list", (STUDY, "1.2.3")),))),
    ("uid-list-backslash", f"StudyInstanceUID={STUDY}%5C1.2.3", "study", None,
     Query("study", (Match("StudyInstanceUID", "list", (STUDY, "1.2.3")),))),
    ("uid-list-of-one", f"StudyInstanceUID={STUDY},", "study", None,
     Query("study", (single("StudyInstanceUID", STUDY),))),
    ("cs-list", "Modality=CT,MR", "series", None,
     Query("series", (Match("Modality", "list", ("CT", "MR")),))),
    ("modalities-in-study-backslash", "ModalitiesInStudy=CT%5CMR", "study", None,
     Query("study", (Match("ModalitiesInStudy", "list", ("CT", "MR")),))),
    ("lo-keeps-its-comma", "StudyDescription=HEAD,NECK", "study", None,
     Query("study", (single("StudyDescription", "HEAD,NECK"),))),
    ("wildcard-star", "PatientName=DOE*", "study", None,
     Query("study", (Match("PatientName", "wildcard", ("DOE*",)),))),
    ("wildcard-question-mark", "AccessionNumber=A?1", "study", None,
     Query("study", (Match("AccessionNumber", "wildcard", ("A?1",)),))),
    ("lone-star-is-universal", "PatientName=*", "study", None,
     Query("study", (Match("PatientName", "universal", ()),))),
    ("stars-only-are-universal", "StudyDescription=***", "study", None,
     Query("study", (Match("StudyDescription", "universal", ()),))),
    ("empty-is-universal", "PatientBirthDate=", "study", None,
     Query("study", (Match("PatientBirthDate", "universal", ()),))),
    ("lone-star-in-an-id-is-universal", "StudyID=*", "study", None,
     Query("study", (Match("StudyID", "universal", ()),))),
    ("date", "StudyDate=20240131", "study", None, Query("study", (single("StudyDate", "20240131"),))),
    ("date-range", "StudyDate=20240101-20241231", "study", None,
     Query("study", (Match("StudyDate", "range", ("20240101", "20241231")),))),
    ("date-range-open-above", "StudyDate=20240101-", "study", None,
     Query("study", (Match("StudyDate", "range", ("20240101", "")),))),
    ("date-range-open-below", "StudyDate=-20241231", "study", None,
     Query("study", (Match("StudyDate", "range", ("", "20241231")),))),
    ("time-partial", "StudyTime=08", "study", None, Query("study", (single("StudyTime", "08"),))),
    ("time-range-with-fraction", "StudyTime=0800-120000.5", "study", None,
     Query("study", (Match("StudyTime", "range", ("0800", "120000.5")),))),
    ("integer-signed", "SeriesNumber=%2B7", "series", None, Query("series", (single("SeriesNumber", "7"),))),
    ("integer-padded", "InstanceNumber=%2007%20", "instance", None,
     Query("instance", (single("InstanceNumber", "7"),))),
    ("fuzzymatching-true", "PatientName=gall&fuzzymatching=true", "study", None,
     Query("study", (single("PatientName", "gall"),), fuzzy=True)),
    ("fuzzymatching-false", "fuzzymatching=false", "study", None, Query("study")),
    ("includefield-keyword", "includefield=PatientAge", "study", None,
     Query("study", includefields=("PatientAge",))),
    ("includefield-tags-comma", "includefield=00081030%2C00080060", "study", None,
     Query("study", includefields=("StudyDescription", "Modality"))),
    ("includefield-mixed-and-spaced", "includefield=00101010, StudyDescription", "study", None,
     Query("study", includefields=("PatientAge", "StudyDescription"))),
    ("includefield-repeated-once", "includefield=00081030&includefield=StudyDescription", "study", None,
     Query("study", includefields=("StudyDescription",))),
    ("includefield-empty-entries", "includefield=,PatientAge,&includefield=", "study", None,
     Query("study", includefields=("PatientAge",))),
    ("includefield-all", "includefield=all", "study", None, Query("study", include_all=True)),
    ("includefield-all-and-more", "includefield=all,PatientAge", "series", None,
     Query("series", includefields=("PatientAge",), include_all=True)),
    ("limit-and-offset", "limit=10&offset=20", "study", None, Query("study", limit=10, offset=20)),
    ("limit-zero", "limit=0", "study", None, Query("study", limit=0)),
    ("limit-leading-zeros", "limit=00007", "study", None, Query("study", limit=7)),
    ("limit-at-its-bound", f"limit={MAX_LIMIT}", "study", None, Query("study", limit=MAX_LIMIT)),
    ("offset-at-its-bound", f"offset={MAX_OFFSET}", "study", None, Query("study", offset=MAX_OFFSET)),
    ("scope-of-series", "SeriesNumber=1", "series", {"StudyInstanceUID": STUDY},
     Query("series", (single("SeriesNumber", "1"),), scope={"StudyInstanceUID": STUDY})),
    ("scope-of-instances", "", "instance", {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES},
     Query("instance", scope={"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES})),
    # What OHIF 3.12 sends when it opens a study (DESIGN.md, "Known traps"):
    ("ohif-study", f"limit=101&offset=0&fuzzymatching=false&includefield=00081030%2C00080060"
     f"&StudyInstanceUID={STUDY}", "study", None,
     Query("study", (single("StudyInstanceUID", STUDY),), ("StudyDescription", "Modality"), limit=101)),
    ("ohif-imaging-history", "00100020=P1&limit=101&offset=0&fuzzymatching=false"
     "&includefield=00081030%2C00080060", "study", None,
     Query("study", (single("PatientID", "P1"),), ("StudyDescription", "Modality"), limit=101)),
    ("ohif-series", "includefield=00080021%2C00080031%2C0008103E%2C00200011", "series",
     {"StudyInstanceUID": STUDY},
     Query("series", includefields=("SeriesDate", "SeriesTime", "SeriesDescription", "SeriesNumber"),
           scope={"StudyInstanceUID": STUDY})),
]  # fmt: skip


@pytest.mark.parametrize("text,level,scope,expected", [c[1:] for c in PARSED], ids=[c[0] for c in PARSED])
def test_a_query_string_is_parsed_into_a_query(text, level, scope, expected):
    assert parsed(text, level, scope) == expected


N = "ab+"  # one word of a fuzzy-matched name
# (id, query string, level, the whole message of the 400)
REFUSED = [
    ("unknown-keyword", "Foo=1", "study",
     "Foo: unknown attribute (expected a DICOM keyword or 8 hex digits)"),
    ("unknown-tag", "ZZZZZZZZ=1", "study",
     "ZZZZZZZZ: unknown attribute (expected a DICOM keyword or 8 hex digits)"),
    ("tag-of-a-private-element", "00090010=1", "study",
     "00090010: unknown attribute (expected a DICOM keyword or 8 hex digits)"),
    ("key-with-brackets", "PatientName%5B0%5D=x", "study",
     "PatientName[0]: unknown attribute (expected a DICOM keyword or 8 hex digits)"),
    ("key-empty", "=x", "study", ": unknown attribute (expected a DICOM keyword or 8 hex digits)"),
    ("key-5000-characters", f"{'K' * 5000}=x", "study",
     f"{'K' * 64!r}... (5000 characters): unknown attribute (expected a DICOM keyword or 8 hex digits)"),
    ("key-a-sequence-path", "ReferencedStudySequence.StudyInstanceUID=1.2", "study",
     "ReferencedStudySequence.StudyInstanceUID: sequence attribute paths are not supported as query key"),
    ("key-below-the-level", "SOPInstanceUID=1.2.3", "study",
     "SOPInstanceUID: not supported as a matching key at study level"),
    ("key-known-but-not-indexed", "PatientAge=040Y", "study",
     "PatientAge: not supported as a matching key at study level"),
    ("key-below-by-tag", "00080060=CT", "study", "00080060: not supported as a matching key at study level"),
    ("key-given-twice", "PatientID=1&PatientID=2", "study", "PatientID: given more than once"),
    ("key-given-twice-as-tag", "PatientID=1&00100020=2", "study", "00100020: given more than once"),
    ("includefield-unknown", "includefield=NotAKeyword", "study",
     "NotAKeyword: unknown attribute (expected a DICOM keyword or 8 hex digits)"),
    ("includefield-hex-prefix", "includefield=0x100010", "study",
     "0x100010: unknown attribute (expected a DICOM keyword or 8 hex digits)"),
    ("includefield-sequence-path", "includefield=00081111.00081150", "study",
     "00081111.00081150: sequence attribute paths are not supported as includefield"),
    ("includefield-past-its-bound", "includefield=" + ",".join(["PatientAge"] * (MAX_INCLUDEFIELDS + 1)),
     "study", f"includefield: at most {MAX_INCLUDEFIELDS} attributes in one query"),
    ("includefield-parameters-past-its-bound", "&".join(["includefield=00101010"] * (MAX_INCLUDEFIELDS + 1)),
     "study", f"includefield: at most {MAX_INCLUDEFIELDS} attributes in one query"),
    ("fuzzymatching-yes", "fuzzymatching=yes", "study", "fuzzymatching: expected true or false, got 'yes'"),
    ("fuzzymatching-twice", "fuzzymatching=true&fuzzymatching=true", "study",
     "fuzzymatching: given more than once"),
    ("fuzzy-words-past-their-bound", f"fuzzymatching=true&PatientName={N * (MAX_FUZZY_WORDS + 1)}", "study",
     f"PatientName: at most {MAX_FUZZY_WORDS} words with fuzzymatching=true"),
    ("fuzzy-words-of-another-name", f"fuzzymatching=true&ReferringPhysicianName={'a+' * 17}", "study",
     f"ReferringPhysicianName: at most {MAX_FUZZY_WORDS} words with fuzzymatching=true"),
    ("limit-negative", "limit=-1", "study", "limit: expected a non-negative integer, got '-1'"),
    ("limit-not-a-number", "limit=ten", "study", "limit: expected a non-negative integer, got 'ten'"),
    ("limit-unicode-digit", "limit=%C2%B2", "study", "limit: expected a non-negative integer, got '²'"),
    ("limit-past-its-bound", f"limit={MAX_LIMIT + 1}", "study",
     f"limit: at most {MAX_LIMIT}, got '2147483648'"),
    ("limit-30-nines", f"limit={'9' * 30}", "study",
     f"limit: at most {MAX_LIMIT}, got {'9' * 24!r}... (30 characters)"),
    ("limit-twice", "limit=1&limit=2", "study", "limit: given more than once"),
    ("offset-past-its-bound", f"offset={MAX_OFFSET + 1}", "study",
     f"offset: at most {MAX_OFFSET}, got '100001'"),
    ("offset-not-a-number", "offset=x", "study", "offset: expected a non-negative integer, got 'x'"),
    ("offset-twice", "offset=0&offset=0", "study", "offset: given more than once"),
    ("uid-with-letters", "StudyInstanceUID=1.2.abc", "study", "StudyInstanceUID: '1.2.abc' is not a UID"),
    ("uid-with-newline", "StudyInstanceUID=1.2.3%0A", "study", "StudyInstanceUID: '1.2.3\\n' is not a UID"),
    ("uid-wildcard", "StudyInstanceUID=1.2.*", "study", "StudyInstanceUID: '1.2.*' is not a UID"),
    ("uid-past-64-characters", f"StudyInstanceUID={'1.' * 32}1", "study",
     f"StudyInstanceUID: {'1.' * 32!r}... (65 characters) is not a UID"),
    ("uid-list-without-values", "StudyInstanceUID=%2C%2C", "study",
     "StudyInstanceUID: ',,' is a list without values"),
    ("uid-list-past-its-bound", "StudyInstanceUID=" + ",".join(["1.2"] * (MAX_LIST + 1)), "study",
     f"StudyInstanceUID: at most {MAX_LIST} values in a list"),
    ("cs-list-past-its-bound", "ModalitiesInStudy=" + ",".join(["CT"] * (MAX_LIST + 1)), "study",
     f"ModalitiesInStudy: at most {MAX_LIST} values in a list"),
    ("cs-list-without-values", "Modality=%2C", "series", "Modality: ',' is a list without values"),
    ("value-past-its-bound", f"PatientName={'a' * (MAX_VALUE_LENGTH + 1)}", "study",
     f"PatientName: at most {MAX_VALUE_LENGTH} characters in a value"),
    ("wildcards-past-the-value-bound", f"PatientName={'*?' * 5000}", "study",
     f"PatientName: at most {MAX_VALUE_LENGTH} characters in a value"),
    ("date-of-a-year", "StudyDate=2024", "study", "StudyDate: '2024' is not a valid DA value"),
    ("date-with-newline", "StudyDate=20240101%0A", "study",
     "StudyDate: '20240101\\n' is not a valid DA value"),
    ("date-range-of-a-year", "StudyDate=20240101-2024", "study",
     "StudyDate: '20240101-2024' is not a DA range"),
    ("date-range-empty", "StudyDate=-", "study", "StudyDate: an empty range"),
    ("time-of-odd-digits", "StudyTime=081", "study", "StudyTime: '081' is not a valid TM value"),
    ("integer-in-words", "InstanceNumber=two", "instance",
     "InstanceNumber: expected an integer from -2147483648 to 2147483647 (IS), got 'two'"),
    ("integer-past-is", "SeriesNumber=2147483648", "series",
     "SeriesNumber: expected an integer from -2147483648 to 2147483647 (IS), got '2147483648'"),
    ("integer-with-underscore", "SeriesNumber=1_0", "series",
     "SeriesNumber: expected an integer from -2147483648 to 2147483647 (IS), got '1_0'"),
    ("us-negative", "Rows=-1", "instance", "Rows: expected an integer from 0 to 65535 (US), got '-1'"),
    ("us-past-its-range", "Rows=65536", "instance",
     "Rows: expected an integer from 0 to 65535 (US), got '65536'"),
]  # fmt: skip


@pytest.mark.parametrize("text,level,message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_query_past_understanding_or_bounds_is_refused_naming_the_key(text, level, message):
    with pytest.raises(QueryError) as refused:
        parsed(text, level)
    assert refused.value.message == message
    assert refused.value.status == 400
    assert len(refused.value.message) < 400, "a message must not echo a huge value"


def test_a_mapping_of_parameters_is_taken_as_its_pairs():
    assert parse_qido({"PatientID": "P1", "limit": "5"}, "study") == parsed("PatientID=P1&limit=5")


def test_a_multidicts_repeated_parameters_are_all_seen():
    with pytest.raises(QueryError, match="limit: given more than once"):
        parse_qido(QueryParams("limit=1&limit=2"), "study")


def test_the_callers_restriction_and_the_path_scope_are_carried():
    restriction = Restriction(patients=frozenset({"1"}))
    query = parse_qido([], "series", {"StudyInstanceUID": STUDY}, restriction)
    assert query.restriction is restriction and query.scope == {"StudyInstanceUID": STUDY}


def test_the_scope_given_is_copied_not_shared():
    scope = {"StudyInstanceUID": STUDY}
    query = parse_qido([], "series", scope)
    scope["SeriesInstanceUID"] = SERIES
    assert query.scope == {"StudyInstanceUID": STUDY}


# (id, query string, level, scope, attributes returned besides the level's defaults)
RETURNED = [
    ("defaults-of-studies", "", "study", None, ()),
    ("includefields-after-defaults", "includefield=PatientAge,StudyDescription", "study", None,
     ("PatientAge",)),
    ("series-out-of-a-study-carry-its-attributes", "", "series", None, DEFAULTS["study"]),
    ("series-of-a-study-do-not", "", "series", {"StudyInstanceUID": STUDY}, ()),
    ("instances-out-of-a-series-carry-both", "", "instance", {"StudyInstanceUID": STUDY},
     DEFAULTS["series"]),
]  # fmt: skip


def _defaults_then(level: str, extra: tuple[str, ...]) -> tuple[str, ...]:
    out = list(DEFAULTS[level])
    return tuple(out + [k for k in extra if k not in out])


@pytest.mark.parametrize("text,level,scope,extra", [c[1:] for c in RETURNED], ids=[c[0] for c in RETURNED])
def test_results_carry_the_defaults_then_what_was_asked(text, level, scope, extra):
    assert returned(parsed(text, level, scope)) == _defaults_then(level, extra)


def test_a_matching_key_is_returned_after_the_defaults():
    query = parsed("Modality=CT&includefield=PatientAge", "series", {"StudyInstanceUID": STUDY})
    assert returned(query) == _defaults_then("series", ("PatientAge",))  # Modality is a default
    query = parsed("BodyPartExamined=HEAD&includefield=PatientAge", "series", {"StudyInstanceUID": STUDY})
    assert returned(query)[-2:] == ("BodyPartExamined", "PatientAge")


@pytest.mark.parametrize("level", ["study", "series", "instance"])
def test_includefield_all_returns_every_attribute_of_the_level_and_above(level):
    held = {
        keyword
        for name in ("study", "series", "instance")[: ("study", "series", "instance").index(level) + 1]
        for keyword in LEVEL_COLUMNS[name] + COMPUTED[name]
    }
    attributes = returned(parsed("includefield=all", level))
    assert held <= set(attributes) and len(attributes) == len(set(attributes))
    assert attributes[: len(DEFAULTS[level])] == DEFAULTS[level]
