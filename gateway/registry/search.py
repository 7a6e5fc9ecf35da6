"""QIDO-RS searches over the index (PS3.18 10.6): the SQL that answers a ``Query``, and the stored
DICOM JSON a page of results reads what the index holds no column for.

``qido`` compiles a query to SQL on its own (pure); what is decided here needs the database: whether
a study query by patient name finds the patients first or walks the studies in date order
(``plan_query``), and the rows themselves. The ``Registry`` methods ``search``, ``holds`` and
``first_instances`` are the HTTP layer's way in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gateway.registry.database import Row, in_chunks
from gateway.registry.qido import MAX_RESULTS, compile_query, count_named, name_match, names_first_below
from gateway.types import Level, Query

if TYPE_CHECKING:
    from gateway.registry.store import Registry

__all__ = ["plan_query", "search", "holds", "first_instances"]

# The stored DICOM JSON of each result's first instance, in the order a retrieval sends them
# (series number, then instance number): one statement per page rather than one per result, and the
# same instance every time (an arbitrary one, LIMIT 1 of a join, gave answers that changed with the
# plan). Each step is an index seek: a study's first series (series_study_order), that series'
# first instance (instances_series_order).
_FIRST_INSTANCE = {
    "instance": "SELECT i.SOPInstanceUID, i.metadata FROM instances i WHERE i.SOPInstanceUID IN ({})",
    "series": "SELECT se.SeriesInstanceUID, (SELECT z.metadata FROM instances z "
    "WHERE z.SeriesInstanceUID = se.SeriesInstanceUID ORDER BY z.InstanceNumber, z.SOPInstanceUID LIMIT 1) "
    "FROM series se WHERE se.SeriesInstanceUID IN ({})",
    "study": "SELECT st.StudyInstanceUID, (SELECT z.metadata FROM instances z WHERE z.SeriesInstanceUID = "
    "(SELECT x.SeriesInstanceUID FROM series x WHERE x.StudyInstanceUID = st.StudyInstanceUID "
    "ORDER BY x.SeriesNumber, x.SeriesInstanceUID LIMIT 1) "
    "ORDER BY z.InstanceNumber, z.SOPInstanceUID LIMIT 1) FROM studies st WHERE st.StudyInstanceUID IN ({})",
}


def plan_query(registry: Registry, query: Query) -> tuple[str, list[Any], int]:
    """The query's SQL (``compile_query``), with the one choice that needs the registry's own
    figures: whether a study query by patient name finds the patients first (few match) or
    walks the studies in date order (many do); see ``names_first_below``."""
    match = name_match(query)
    names_first = True
    if match is not None:
        rows = registry.estimated_rows(("patients", "studies"))
        page = min(query.limit if query.limit is not None else MAX_RESULTS, MAX_RESULTS) + 1 + query.offset
        below = names_first_below(rows["patients"], rows["studies"], page)
        if below < rows["patients"]:
            sql, params = count_named(match, below, registry.dialect)  # reads at most ``below``
            names_first = registry.query(sql, params)[0][0] < below
    return compile_query(query, registry.dialect, names_first)


def search(registry: Registry, query: Query) -> tuple[list[Row], bool]:
    """The rows of the page ``query`` asks for (at most ``MAX_RESULTS``), each with the columns
    of its level and the levels above, and whether more rows matched past the page."""
    sql, params, limit = plan_query(registry, query)
    rows = registry.query(sql, params)
    return rows[:limit], len(rows) > limit


def holds(registry: Registry, scope: Mapping[str, str]) -> bool:
    """Whether the index holds the study (and the series of that study) that ``scope`` names by
    ``StudyInstanceUID`` (and ``SeriesInstanceUID``); an empty scope names the whole index."""
    study = scope.get("StudyInstanceUID")
    series = scope.get("SeriesInstanceUID")
    if series is not None:
        return bool(
            registry.query(
                "SELECT 1 FROM series WHERE SeriesInstanceUID=? AND StudyInstanceUID=?", (series, study)
            )
        )
    if study is not None:
        return bool(registry.query("SELECT 1 FROM studies WHERE StudyInstanceUID=?", (study,)))
    return True


def first_instances(registry: Registry, level: Level, uids: Sequence[str]) -> dict[str, bytes]:
    """The stored DICOM JSON of the first instance (in retrieval order) of each study, series or
    instance (by ``level``) that ``uids`` name; a UID without one is left out."""
    uids = list(dict.fromkeys(uids))
    out: dict[str, bytes] = {}
    for chunk in in_chunks(uids):
        sql = _FIRST_INSTANCE[level].format(",".join("?" * len(chunk)))
        for uid, metadata in registry.query(sql, chunk):
            if metadata is not None:
                out[uid] = metadata
    return out
