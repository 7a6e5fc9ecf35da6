"""The QIDO-RS attribute catalogue: which attributes are columns, at which level, and what is
returned by default (PS3.18 10.6.1.2 / Tables 10.6.3-3 to 10.6.3-5, formerly 6.7.1-2).

Columns are named by DICOM keyword. Anything not listed here is still searchable by ``includefield``
(it is read from the stored DICOM JSON) but is not a matching key.
"""

from __future__ import annotations

import functools

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

__all__ = [
    "PATIENT",
    "STUDY",
    "SERIES",
    "INSTANCE",
    "LEVEL_COLUMNS",
    "MATCHING",
    "DEFAULTS",
    "COMPUTED",
    "vr_of",
    "resolve_attribute",
]

PATIENT = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex")
STUDY = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "TimezoneOffsetFromUTC",
)
SERIES = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
INSTANCE = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "ContentDate",
    "ContentTime",
)

LEVEL_COLUMNS = {"study": PATIENT + STUDY, "series": SERIES, "instance": INSTANCE}

# Attributes computed from the index rather than stored (PS3.18 Table 10.6.3-3).
COMPUTED = {
    "study": ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "series": ("NumberOfSeriesRelatedInstances",),
    "instance": (),
}

# Matching keys accepted per query level. A query at series or instance level may also match on
# the levels above it (PS3.18 10.6.1.3.1: "relational" queries across levels).
MATCHING = {
    "study": PATIENT + STUDY + ("ModalitiesInStudy",),
    "series": PATIENT + STUDY + ("ModalitiesInStudy",) + SERIES,
    "instance": PATIENT + STUDY + ("ModalitiesInStudy",) + SERIES + INSTANCE,
}

# Default return attributes (PS3.18 Table 10.6.3-3 study, -4 series, -5 instance).
DEFAULTS = {
    "study": (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "TimezoneOffsetFromUTC",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "series": (
        "Modality",
        "TimezoneOffsetFromUTC",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "StudyInstanceUID",
    ),
    "instance": (
        "SOPClassUID",
        "SOPInstanceUID",
        "TimezoneOffsetFromUTC",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    ),
}


@functools.cache
def vr_of(keyword: str) -> str:
    # Cached: QIDO asks for every attribute of every result row (pydicom's lookup was 45% of a
    # 1,000-row answer).
    if keyword == "ModalitiesInStudy":
        return "CS"
    return str(dictionary_VR(keyword))


def resolve_attribute(name: str) -> str | None:
    """A QIDO attribute given as a keyword or as 8 hex digits, as its keyword; None if unknown."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        # int(..., 16) alone also takes "-0000001", "0x100010" and "1_000010"
        return keyword_for_tag(int(name, 16)) or None
    if tag_for_keyword(name) is not None:
        return name
    return None
