"""QIDO-RS search transactions (PS3.18 10.6): index rows to DICOM JSON.

Results are built from indexed columns. Every returned attribute (defaults, matching keys,
``includefield``) that the query does not select as a column (one the index does not hold, or one
of a lower level, such as Modality at study level) is read from the stored DICOM JSON of the
result's first instance, in the order a retrieval sends them: it is never left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio.to_thread
import orjson
from pydicom.datadict import tag_for_keyword
from starlette.requests import Request
from starlette.responses import Response

from gateway.codec.attributes import COMPUTED, LEVEL_COLUMNS, vr_of
from gateway.dicomweb.query import parse_qido, returned
from gateway.dicomweb.scope import not_found
from gateway.registry.qido import MAX_RESULTS
from gateway.registry.record import person_name_json
from gateway.registry.store import Registry, Row
from gateway.types import Level, Query, Restriction

__all__ = ["search", "DICOM_JSON"]

DICOM_JSON = "application/dicom+json"
_NUMBERS = {"IS": int, "US": int, "UL": int, "SS": int, "SL": int, "DS": float, "FL": float, "FD": float}
_HELD = {k for columns in LEVEL_COLUMNS.values() for k in columns} | {
    k for computed in COMPUTED.values() for k in computed
}
_TAGS: dict[str, str] = {}


def _tag(keyword: str) -> str:
    tag = _TAGS.get(keyword)
    if tag is None:
        tag = _TAGS[keyword] = f"{tag_for_keyword(keyword):08X}"
    return tag


async def search(
    request: Request,
    registry: Registry,
    level: str,
    scope: dict[str, str],
    base_url: str,
    restriction: Restriction | None = None,
    patients: set[str] | None = None,
) -> Response:
    """``restriction``: what the caller may see (the access policy's); the rest is left out.
    ``patients``: filled with the patient of every result (INS, else PatientID), for the audit."""
    query = parse_qido(request.query_params.multi_items(), level, scope, restriction)
    results, cut = await anyio.to_thread.run_sync(_run, registry, query, base_url, patients)
    headers = {}
    if cut:
        # PS3.18 8.3.4.4: tell the client that more results exist than were returned.
        headers["Warning"] = (
            f'299 gateway "The number of results exceeded the maximum supported '
            f'by the server ({MAX_RESULTS}). Additional results can be requested."'
        )
    return Response(orjson.dumps(results), media_type=DICOM_JSON, headers=headers)


def _run(
    registry: Registry, query: Query, base_url: str, patients: set[str] | None = None
) -> tuple[list[dict[str, Any]], bool]:
    if query.scope and not registry.holds(query.scope):
        raise not_found(query.scope)
    rows, more = registry.search(query)
    # Only a page the server cut is said to be (PS3.18 8.3.4.4), not one the client's limit ended.
    cut = more and (query.limit is None or query.limit > MAX_RESULTS)
    if not rows:
        return [], cut
    if patients is not None:
        patients.update(row["INS"] or row["PatientID"] or "" for row in rows)
        patients.discard("")
    render, stored = _renderer(query.level, rows[0].keys(), list(returned(query)), base_url)
    documents = _first_instances(registry, query.level, rows) if stored else {}
    return [render(row, documents) for row in rows], cut


# How a result's element is made (see ``_renderer``): a text column (split on the value
# delimiter), a person name, a number, ModalitiesInStudy, a constant, the RetrieveURL, or an
# attribute read from the stored DICOM JSON. Text columns hold str (their declared type).
_TEXT, _PERSON, _NUMBER, _MODALITIES, _CONSTANT, _URL, _STORED = range(7)
_DEPTH = {"study": 1, "series": 2, "instance": 3}  # UIDs in a level's RetrieveURL


def _renderer(
    level: str, keys: list[str], returned: list[str], base_url: str
) -> tuple[Callable[[Row, dict[str, Any]], dict[str, Any]], bool]:
    """A function from a row (and the stored DICOM JSON of the page's first instances, see
    ``_first_instances``) to its result, planned once per request: the element for each returned
    attribute, in tag order, with its column position, VR and conversion decided here rather than
    per row (a 1,000-result page built per row and per attribute spent ~60 us a result doing so;
    bench/scale.py). Also returns whether any attribute is read from the stored JSON."""
    position: dict[str, int] = {}
    for index, name in enumerate(keys):
        position.setdefault(name, index)  # a repeated name: the first, as rows answer by name
    steps: list[tuple[str, Any, str, int]] = [
        ("00080005", {"vr": "CS", "Value": ["ISO_IR 192"]}, "CS", _CONSTANT)
    ]
    key = position[_KEY[level]]
    for keyword in returned:
        vr = vr_of(keyword)
        if keyword not in _HELD or keyword not in position:
            # Not a column of this query (the index does not hold it, or it belongs to a lower
            # level): from the stored JSON, never left out. PS3.18 10.6.3.3: what includefield
            # names and the matching keys are returned (a column the query once failed to select
            # made ContentDate and ContentTime vanish without a word).
            steps.append((_tag(keyword), key, vr, _STORED))
        else:
            kind = (
                _MODALITIES
                if keyword == "ModalitiesInStudy"
                else _PERSON
                if vr == "PN"
                else _NUMBER
                if vr in _NUMBERS
                else _TEXT
            )
            steps.append((_tag(keyword), position[keyword], vr, kind))
    # RetrieveURL (PS3.18 10.6.3.3): the resource's URL, from its UIDs.
    names = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")[: _DEPTH[level]]
    uids = [position[name] for name in names]
    steps.append(("00081190", uids, "UR", _URL))
    steps.sort(key=lambda step: step[0])
    plan = tuple(steps)
    segments = ("/studies/", "/series/", "/instances/")

    def render(row: Row, documents: dict[str, Any]) -> dict[str, Any]:
        values = tuple(row)  # positions by C indexing, not a row class's own __getitem__
        out: dict[str, Any] = {}
        for tag, where, vr, kind in plan:
            if kind == _TEXT:  # most attributes: tested first
                value = values[where]
                out[tag] = {"vr": vr, "Value": value.split("\\")} if value else {"vr": vr}
            elif kind == _PERSON:
                value = values[where]
                out[tag] = (
                    {"vr": vr, "Value": [person_name_json(v) for v in value.split("\\")]}
                    if value
                    else {"vr": vr}
                )
            elif kind == _CONSTANT:
                out[tag] = where
            elif kind == _URL:
                url = base_url + "".join(segment + values[i] for segment, i in zip(segments, where))
                out[tag] = {"vr": vr, "Value": [url]}
            elif kind == _NUMBER:
                value = values[where]
                if value is None or value == "":
                    out[tag] = {"vr": vr}
                elif isinstance(value, int | float):
                    out[tag] = {"vr": vr, "Value": [value]}
                else:
                    out[tag] = {"vr": vr, "Value": [_NUMBERS[vr](v) for v in str(value).split("\\")]}
            elif kind == _MODALITIES:  # the distinct modalities of the study's series, as aggregated
                value = values[where]
                out[tag] = {"vr": vr, "Value": sorted(set(value.split(",")))} if value else {"vr": vr}
            else:  # _STORED: from the result's first instance's DICOM JSON
                out[tag] = documents.get(values[where], {}).get(tag, {"vr": vr})
        return out

    return render, any(step[3] == _STORED for step in plan)


_KEY = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}


def _first_instances(registry: Registry, level: Level, rows: list[Row]) -> dict[str, Any]:
    """The parsed DICOM JSON of each row's first instance (in the order a retrieval sends them,
    the same instance every time), by the row's UID at ``level``."""
    stored = registry.first_instances(level, [row[_KEY[level]] for row in rows])
    return {uid: orjson.loads(metadata) for uid, metadata in stored.items()}
