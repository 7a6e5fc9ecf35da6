"""Harvest of a DIMSE PACS: C-FIND at study, series and image level (Study Root, PS3.4 C.6.2),
each instance listed with the attributes its identifiers carry.

C-FIND answers hold the keys asked for and little else (PS3.4 C.4.1.1.3.2): many PACS return no
image attributes at IMAGE level, so an instance's frame count may be unknown until it is first
retrieved, when the source learns its whole header (``DimseSource.learns_on_retrieve``).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Collection, Iterator
from typing import Any

import orjson
from pydicom.dataset import Dataset
from pynetdicom.association import Association

from gateway.codec.attributes import INSTANCE, PATIENT, SERIES, STUDY
from gateway.codec.dicomjson import dataset_json
from gateway.stream.dimse.associations import QUERIES, STUDY_FIND, AssociationPool
from gateway.stream.dimse.ian import valid_uid
from gateway.stream.dimse.replies import PENDING, Replies
from gateway.types import Entry, PixelInfo

__all__ = ["scan", "scan_paths"]

# Return keys per level; OtherPatientIDsSequence carries the INS at many sites (an empty
# sequence asks for it, PS3.4 C.2.2.2.6); PACS that do not support it just leave it out.
# QueryRetrieveLevel, RetrieveAETitle, InstanceAvailability: about the query, not the instance.
_QUERY_ONLY = ("00080052", "00080054", "00080056")
_KEYS = {"study": PATIENT + STUDY + ("OtherPatientIDsSequence",), "series": SERIES, "image": INSTANCE}


def scan(associations: AssociationPool, replies: Replies, since: str | None = None) -> Iterator[Entry]:
    """Every instance the PACS lists (blocking, in a worker thread), in studies dated ``since``
    (YYYYMMDD) or later when given."""
    window = {"StudyDate": f"{since}-"} if since else {}  # a range match (PS3.4 C.2.2.2.5)
    with associations.acquire(QUERIES) as assoc:
        # Studies and series are listed in full before the next C-FIND on this association
        # (one operation at a time on it); instances are indexed as their responses arrive.
        for study in list(_find(assoc, replies, "STUDY", window, _KEYS["study"])):
            yield from _study(assoc, replies, study, None)


def scan_paths(associations: AssociationPool, replies: Replies, paths: Collection[str]) -> Iterator[Entry]:
    """What ``scan`` lists at or under each of ``paths`` (``/studies/S``, ``/studies/S/series/SE``
    or an instance's path, whose series is listed), with C-FINDs restricted to those studies and
    series: a study the PACS does not hold lists nothing. Paths of any other shape, or whose UIDs
    are not UIDs (a ``*`` would be a wildcard to some PACS), list nothing."""
    wanted: dict[str, set[str] | None] = {}  # study -> its series asked for (None: all of them)
    for path in paths:
        parts = path.strip("/").split("/")
        if len(parts) < 2 or parts[0] != "studies" or not all(valid_uid(uid) for uid in parts[1::2]):
            continue
        if len(parts) == 2:
            wanted[parts[1]] = None
        elif len(parts) in (4, 6) and parts[2] == "series":
            series = wanted.setdefault(parts[1], set())
            if series is not None:  # else the whole study is listed anyway
                series.add(parts[3])
    if not wanted:
        return
    with associations.acquire(QUERIES) as assoc:
        for study_uid, series in sorted(wanted.items()):
            match = {"StudyInstanceUID": study_uid}
            for study in list(_find(assoc, replies, "STUDY", match, _KEYS["study"])):
                if str(study.get("StudyInstanceUID", "")) == study_uid:  # what was asked, only
                    yield from _study(assoc, replies, study, series)


def _study(assoc: Association, replies: Replies, study: Dataset, only: set[str] | None) -> Iterator[Entry]:
    """The instances of one study the PACS listed, in each of its series (``only`` those)."""
    study_uid = str(study.StudyInstanceUID)
    matches = (
        [{"StudyInstanceUID": study_uid}]
        if only is None
        else [{"StudyInstanceUID": study_uid, "SeriesInstanceUID": uid} for uid in sorted(only)]
    )
    for match in matches:
        for series in list(_find(assoc, replies, "SERIES", match, _KEYS["series"])):
            if only is not None and str(series.get("SeriesInstanceUID", "")) not in only:
                continue
            scope = {
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": str(series.SeriesInstanceUID),
            }
            # The study's and series' attributes are converted once for all its instances.
            common = _identifier_json(study) | _identifier_json(series)
            for image in _find(assoc, replies, "IMAGE", scope, _KEYS["image"]):
                yield _entry(common, study, series, image)


def _find(
    assoc: Association, replies: Replies, level: str, match: dict[str, str], keys: tuple[str, ...]
) -> Iterator[Dataset]:
    """The identifiers of a C-FIND's pending responses, yielded as they arrive so that indexing
    them overlaps with receiving the next ones."""
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword in keys:
        setattr(query, keyword, [] if keyword.endswith("Sequence") else "")
    for keyword, value in match.items():
        setattr(query, keyword, value)
    started = time.monotonic()
    deadline = started + replies.deadlines.total
    for status, identifier in assoc.send_c_find(query, STUDY_FIND):
        replies.check_deadline(assoc, deadline, f"C-FIND at {level} level")
        code = replies.status(status, f"C-FIND at {level} level", started)
        if code in PENDING and identifier is not None:
            yield identifier


def _entry(common: dict[str, Any], study: Dataset, series: Dataset, image: Dataset) -> Entry:
    body = common | _identifier_json(image)
    raw = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    base = (
        f"/studies/{study.StudyInstanceUID}/series/{series.SeriesInstanceUID}"
        f"/instances/{image.SOPInstanceUID}"
    )
    # Many PACS do not return image attributes at IMAGE level (dcmqrscp does not): then the
    # frame count is unknown (-1) until the instance itself is retrieved.
    rows = image.get("Rows")
    frames = int(image.get("NumberOfFrames") or 1) if rows else (0 if "Rows" in image else -1)
    pixel = PixelInfo(None, "remote", False, "OW", -1, -1, {"remote": frames, "bulk": {}})
    if frames:
        body["7FE00010"] = {"vr": "OW", "BulkDataURI": f"{base}/bulk/7FE00010"}
    return Entry(base, len(raw), zlib.crc32(raw), prepared=(body, pixel))


def _identifier_json(identifier: Dataset) -> dict[str, Any]:
    """A C-FIND identifier's attributes as DICOM JSON, raw elements converted as they came (each
    identifier carries its own Specific Character Set, PS3.4 C.4.1.1.3.1)."""
    body = dataset_json(identifier, lambda path: path)
    for key in _QUERY_ONLY:
        body.pop(key, None)
    return body
