"""QIDO-RS search transactions (PS3.18 10.6): index rows to DICOM JSON.

Results are built from indexed columns; only attributes named by ``includefield`` that the index
does not hold as columns are read from one instance's stored DICOM JSON.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio.to_thread
import orjson
from pydicom.datadict import tag_for_keyword
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import NotFound
from gateway.registry.attributes import COMPUTED, LEVEL_COLUMNS, vr_of
from gateway.registry.database import Row
from gateway.registry.qido import MAX_RESULTS, Query, Restriction, compile_query, parse_qido
from gateway.registry.record import person_name_json
from gateway.registry.store import Registry

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
) -> Response:
    """``restriction``: what the caller may see (the access policy's); the rest is left out."""
    query = replace(parse_qido(request.query_params.multi_items(), level, scope), restriction=restriction)
    results, cut = await anyio.to_thread.run_sync(_run, registry, query, base_url)
    headers = {}
    if cut:
        # PS3.18 8.3.4.4: tell the client that more results exist than were returned.
        headers["Warning"] = (
            f'299 gateway "The number of results exceeded the maximum supported '
            f'by the server ({MAX_RESULTS}). Additional results can be requested."'
        )
    return Response(orjson.dumps(results), media_type=DICOM_JSON, headers=headers)


def _run(registry: Registry, query: Query, base_url: str) -> tuple[list[dict[str, Any]], bool]:
    if query.scope:
        _check_scope(registry, query.scope)
    sql, params, limit = compile_query(query, registry.dialect)
    rows = registry.query(sql, params)
    cut = len(rows) > limit and (query.limit is None or query.limit > MAX_RESULTS)
    rows = rows[:limit]
    returned = list(query.returned)
    if query.include_all:
        returned += [k for k in _level_attributes(query.level) if k not in returned]
    extra = [k for k in returned if k not in _HELD]
    return [_result(registry, query.level, row, returned, extra, base_url) for row in rows], cut


def _level_attributes(level: str) -> list[str]:
    order = {"study": ("study",), "series": ("study", "series"), "instance": ("study", "series", "instance")}[
        level
    ]
    out: list[str] = []
    for name in order:
        out += list(LEVEL_COLUMNS[name]) + list(COMPUTED[name])
    return out


def _check_scope(registry: Registry, scope: dict[str, str]) -> None:
    study = scope.get("StudyInstanceUID")
    series = scope.get("SeriesInstanceUID")
    if series is not None:
        if not registry.query(
            "SELECT 1 FROM series WHERE SeriesInstanceUID=? AND StudyInstanceUID=?", (series, study)
        ):
            raise NotFound(f"series {series} not found in study {study}")
    elif study is not None and not registry.query("SELECT 1 FROM studies WHERE StudyInstanceUID=?", (study,)):
        raise NotFound(f"study {study} not found")


def _result(
    registry: Registry, level: str, row: Row, returned: list[str], extra: list[str], base_url: str
) -> dict[str, Any]:
    keys = row.keys()
    out: dict[str, Any] = {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}}
    for keyword in returned:
        if keyword in _HELD and keyword in keys:
            out[_tag(keyword)] = _element(keyword, row[keyword])
    if extra:
        stored = _stored_metadata(registry, level, row)
        for keyword in extra:
            tag = _tag(keyword)
            out[tag] = stored.get(tag, {"vr": vr_of(keyword)})
    url = f"{base_url}/studies/{row['StudyInstanceUID']}"
    if level != "study":
        url += f"/series/{row['SeriesInstanceUID']}"
    if level == "instance":
        url += f"/instances/{row['SOPInstanceUID']}"
    out["00081190"] = {"vr": "UR", "Value": [url]}  # RetrieveURL (PS3.18 10.6.3.3)
    return dict(sorted(out.items()))


def _element(keyword: str, value: Any) -> dict[str, Any]:
    vr = vr_of(keyword)
    if value is None or value == "":
        return {"vr": vr}
    if keyword == "ModalitiesInStudy":
        return {"vr": vr, "Value": sorted(set(str(value).split(",")))}
    if vr == "PN":
        return {"vr": vr, "Value": [person_name_json(v) for v in str(value).split("\\")]}
    if vr in _NUMBERS:
        if isinstance(value, int | float):
            return {"vr": vr, "Value": [value]}
        return {"vr": vr, "Value": [_NUMBERS[vr](v) for v in str(value).split("\\")]}
    return {"vr": vr, "Value": str(value).split("\\")}


def _stored_metadata(registry: Registry, level: str, row: Row) -> dict[str, Any]:
    if level == "instance":
        found = registry.query(
            "SELECT metadata FROM instances WHERE SOPInstanceUID=?", (row["SOPInstanceUID"],)
        )
    elif level == "series":
        found = registry.query(
            "SELECT metadata FROM instances WHERE SeriesInstanceUID=? LIMIT 1", (row["SeriesInstanceUID"],)
        )
    else:
        found = registry.query(
            "SELECT i.metadata FROM instances i JOIN series se ON se.SeriesInstanceUID = "
            "i.SeriesInstanceUID WHERE se.StudyInstanceUID=? LIMIT 1",
            (row["StudyInstanceUID"],),
        )
    return orjson.loads(found[0][0]) if found else {}
