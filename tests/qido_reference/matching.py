"""What a QIDO query must answer, computed in plain Python from the world's model: PS3.4 C.2.2.2
matching (single value, ``*`` ``?`` wildcards, UID lists, DA/TM ranges, universal matching, an
attribute absent from the index matched as a zero-length value), person names case- and
accent-insensitive and fuzzy matching as the README documents them (each query word begins a word of
a name component), the INS joining patient IDs across sites, the answer's order, paging and its
Warning (PS3.18 8.3.4.4), and every returned attribute (PS3.18 10.6.3.3), counts included. Nothing
here calls ``gateway.registry.qido``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_for_tag

from gateway.codec.attributes import COMPUTED, DEFAULTS, LEVEL_COLUMNS
from gateway.registry.record import INS_ISSUERS
from tests.qido_reference.world import World, element, fold, tag, vr

__all__ = ["Query", "Expected", "Row", "View", "answer", "view_of", "counts", "LEVELS", "HELD_AT"]

LEVELS = ("study", "series", "instance")
INTEGER_VRS = {"IS", "US", "UL", "SS", "SL"}
WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}  # PS3.4 C.2.2.2.4
MAX_RESULTS = 1000  # the gateway's page (README: at most 1,000 results, Warning when cut)
HELD_AT = {level: LEVEL_COLUMNS[level] + COMPUTED[level] for level in LEVELS}
SELECTED = {  # what a query at each level answers from its own columns
    "study": HELD_AT["study"],
    "series": HELD_AT["study"] + HELD_AT["series"],
    "instance": HELD_AT["study"] + HELD_AT["series"] + HELD_AT["instance"],
}


def view_of(world: World) -> View:
    """The rows the world's registry must hold now (built once after each change)."""
    if world.view is None:
        world.view = View(world)
    return world.view


def counts(world: World) -> dict[str, int]:
    """What the registry's own counts must be (``Registry.counts()``)."""
    view = view_of(world)
    return {
        "studies": len(view.rows["study"]),
        "series": len(view.rows["series"]),
        "instances": len(view.rows["instance"]),
        "locations": len(world.locations),
    }


# -- what the registry must show ----------------------------------------------------------------------


class Row:
    __slots__ = ("level", "attrs", "parent", "children", "uid", "first")

    def __init__(self, level: str, uid: str, attrs: dict[str, Any], parent: Row | None) -> None:
        self.level, self.uid, self.attrs, self.parent = level, uid, attrs, parent
        self.children: list[Row] = []
        self.first: str = ""  # the first instance, in retrieval order

    def get(self, keyword: str) -> Any:
        row: Row | None = self
        while row is not None:
            if keyword in row.attrs:
                return row.attrs[keyword]
            row = row.parent
        return None


class View:
    """The rows the registry must hold, after every write, with their computed attributes."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.rows: dict[str, dict[str, Row]] = {level: {} for level in LEVELS}
        patients = {p.key: p for p in world.patients}
        for uid in sorted(world.stored):
            stored = world.stored[uid]
            series, study = stored.series, stored.series.study
            if study.uid not in self.rows["study"]:
                patient = patients[study.patient.key]
                attrs = {**patient.versions[world.patient_rows[patient.key]], **study.attrs}
                attrs.update(INS=patient.ins, StudyInstanceUID=study.uid)
                self.rows["study"][study.uid] = Row("study", study.uid, _indexed(attrs, "study"), None)
            study_row = self.rows["study"][study.uid]
            if series.uid not in self.rows["series"]:
                attrs = _indexed({**series.attrs, "SeriesInstanceUID": series.uid}, "series")
                row = Row("series", series.uid, attrs, study_row)
                self.rows["series"][series.uid] = row
                study_row.children.append(row)
            series_row = self.rows["series"][series.uid]
            attrs = _indexed(
                {**world.instances[uid].copy_attrs(stored.source), "SOPInstanceUID": uid}, "instance"
            )
            row = Row("instance", uid, attrs, series_row)
            self.rows["instance"][uid] = row
            series_row.children.append(row)
        for series_row in self.rows["series"].values():
            series_row.attrs["NumberOfSeriesRelatedInstances"] = len(series_row.children)
            series_row.children.sort(key=self.order_key("instance"))
            series_row.first = series_row.children[0].uid
        for study_row in self.rows["study"].values():
            modalities = sorted({m for s in study_row.children if (m := s.attrs.get("Modality"))})
            study_row.attrs["ModalitiesInStudy"] = modalities or None
            study_row.attrs["NumberOfStudyRelatedSeries"] = len(study_row.children)
            study_row.attrs["NumberOfStudyRelatedInstances"] = sum(
                len(s.children) for s in study_row.children
            )
            study_row.children.sort(key=self.order_key("series"))
            study_row.first = study_row.children[0].first
        for row in self.rows["instance"].values():
            row.first = row.uid

    def null(self, value: Any) -> tuple[Any, ...]:
        """A sort key where an absent value sorts as the database sorts NULL: first (SQLite) or
        last (PostgreSQL) in ascending order."""
        if value is None:
            return (0,) if self.world.dialect == "sqlite" else (2,)
        return (1, value)

    def order_key(self, level: str) -> Callable[[Row], tuple[Any, ...]]:
        number = {"series": "SeriesNumber", "instance": "InstanceNumber"}[level]
        return lambda row: (self.null(row.attrs.get(number)), row.uid)

    def ordered(self, level: str, rows: list[Row]) -> list[Row]:
        """The answer's order: studies newest first (date, then time), then by UID; series and
        instances by number, then UID."""
        if level != "study":
            return sorted(rows, key=self.order_key(level))
        rows = sorted(rows, key=lambda row: row.uid)
        rows.sort(key=lambda row: self.null(micros(row.attrs.get("StudyTime"))), reverse=True)
        rows.sort(key=lambda row: self.null(row.attrs.get("StudyDate")), reverse=True)
        return rows


def _indexed(attrs: dict[str, Any], level: str) -> dict[str, Any]:
    keys = (LEVEL_COLUMNS["study"] + ("INS",)) if level == "study" else LEVEL_COLUMNS[level]
    return {k: attrs.get(k) for k in keys}


# -- matching: PS3.4 C.2.2.2 and the README, in plain Python -------------------------------------------


@dataclass(frozen=True)
class Query:
    level: str
    scope: tuple[tuple[str, str], ...]  # UIDs in the path
    params: tuple[tuple[str, str], ...]  # the query string, in order

    @property
    def url(self) -> str:
        path = "".join(f"/{_RESOURCE[k]}/{uid}" for k, uid in self.scope)
        return f"/dicom-web{path}/{_RESOURCE[self.level]}"


_RESOURCE = {"study": "studies", "series": "series", "instance": "instances",
             "StudyInstanceUID": "studies", "SeriesInstanceUID": "series"}  # fmt: skip


def micros(value: str | None) -> int | None:
    """A TM value (HH, HHMM, HHMMSS, HHMMSS.F..., or HH:MM:SS) as microseconds since midnight."""
    if value is None:
        return None
    whole, _, fraction = value.strip().replace(":", "").partition(".")
    whole = (whole + "000000")[:6]
    return ((int(whole[:2]) * 60 + int(whole[2:4])) * 60 + int(whole[4:6])) * 10**6 + int(
        (fraction + "000000")[:6]
    )


def _time_span(value: str) -> tuple[int, int]:
    """The instants a TM value covers: '10' is 10:00:00 to 10:59:59.999999."""
    whole, _, fraction = value.partition(".")
    start = micros(value)
    assert start is not None
    unit = 10 ** (6 - len(fraction)) if fraction else {2: 3600, 4: 60, 6: 1}[len(whole)] * 10**6
    return start, start + unit - 1


def _wildcard(value: str, pattern: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def name_words(value: str) -> list[str]:
    for separator in "^=,":
        value = value.replace(separator, " ")
    return fold(value).split()


def _query_words(value: str) -> list[str]:
    return [w for w in re.split(r"[\s^=,*?]+", fold(value)) if w]


class Condition:
    """One matching key of a query, parsed as PS3.4 C.2.2.2 says."""

    def __init__(self, keyword: str, value: str, fuzzy: bool) -> None:
        self.keyword, self.value, self.fuzzy = keyword, value, fuzzy
        self.vr = vr(keyword)
        if value == "":
            self.kind = "universal"
        elif self.vr == "UI" or (self.vr == "CS" and re.search(r"[,\\]", value)):
            self.kind, self.values = "list", [v for v in re.split(r"[,\\]", value) if v]
        elif self.vr in ("DA", "TM") and "-" in value:
            self.kind, self.values = "range", value.split("-")
        elif self.vr in INTEGER_VRS:
            self.kind, self.number = "integer", int(value)
        elif self.vr in WILDCARD_VRS and ("*" in value or "?" in value):
            self.kind = "wildcard"
        else:
            self.kind = "single"

    def matches(self, stored: Any) -> bool:
        if self.kind == "universal":
            return True
        if self.vr == "PN":
            return self._person(stored)
        if self.kind == "list":
            return stored in self.values
        if self.kind == "integer":
            return stored == self.number
        if self.vr == "TM":
            at = micros(stored)
            if at is None:
                return False
            low, high = self.values if self.kind == "range" else (self.value, self.value)
            return (not low or _time_span(low)[0] <= at) and (not high or at <= _time_span(high)[1])
        if self.vr == "DA" and self.kind == "range":
            low, high = self.values
            return stored is not None and (not low or low <= stored) and (not high or stored <= high)
        if self.kind == "wildcard":  # an absent value is a zero-length one: "*" matches it
            return _wildcard(stored or "", self.value)
        return stored == self.value

    def _person(self, stored: str | None) -> bool:
        if self.fuzzy:  # each query word begins a word of some name component
            words = name_words(stored or "")
            return all(any(w.startswith(q) for w in words) for q in _query_words(self.value))
        if self.kind == "wildcard":
            return _wildcard(fold(stored or ""), fold(self.value))
        return stored is not None and fold(stored) == fold(self.value)


@dataclass
class Expected:
    status: int
    items: list[dict[str, Any]] = field(default_factory=list)
    warning: bool = False


def answer(world: World, query: Query, base_url: str = "http://gateway.test/dicom-web") -> Expected:
    view = view_of(world)
    params: dict[str, str] = {}
    includes: list[str] = []
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    for name, value in query.params:
        if name == "includefield":
            for item in filter(None, (v.strip() for v in value.split(","))):
                if item == "all":
                    include_all = True
                else:
                    includes.append(_keyword(item))
        elif name == "limit":
            limit = int(value)
        elif name == "offset":
            offset = int(value)
        elif name == "fuzzymatching":
            fuzzy = value == "true"
        else:
            params[_keyword(name)] = value
    scope = dict(query.scope)
    # 404 for a path naming what is not there (PS3.18 10.6.2: the resource does not exist).
    study = view.rows["study"].get(scope.get("StudyInstanceUID", ""))
    if "StudyInstanceUID" in scope and study is None:
        return Expected(404)
    if "SeriesInstanceUID" in scope:
        series = view.rows["series"].get(scope["SeriesInstanceUID"])
        if series is None or series.parent is not study:
            return Expected(404)
    # The path's UIDs and the query's keys both hold (a key may name the path's UID again).
    conditions = [Condition(k, v, fuzzy) for k, v in params.items()]
    conditions += [Condition(k, uid, False) for k, uid in scope.items()]
    patient_id = (
        params.get("PatientID") is not None and Condition("PatientID", params["PatientID"], fuzzy) or None
    )
    issuer = params.get("IssuerOfPatientID")
    ins_only = patient_id is not None and patient_id.kind == "single" and issuer in INS_ISSUERS
    skipped = {"PatientID", "IssuerOfPatientID"} if ins_only else {"PatientID"}
    by_level: dict[str, list[Condition]] = {level: [] for level in LEVELS}
    for condition in conditions:
        if condition.keyword not in skipped:
            by_level[_LEVEL_OF.get(condition.keyword, "study")].append(condition)

    def study_matches(row: Row) -> bool:
        if patient_id is not None:
            if ins_only:
                if row.attrs["INS"] != patient_id.value:
                    return False
            elif patient_id.kind == "single":
                # README: a single PatientID also finds the patient's INS at every site.
                if patient_id.value not in (row.attrs["PatientID"], row.attrs["INS"]):
                    return False
            elif not patient_id.matches(row.attrs["PatientID"]):
                return False
        for condition in by_level["study"]:
            if condition.keyword == "ModalitiesInStudy":
                if condition.kind != "universal" and not any(
                    condition.matches(s.attrs["Modality"]) for s in row.children
                ):
                    return False
            elif not condition.matches(row.attrs.get(condition.keyword)):
                return False
        return True

    rows = [row for row in view.rows["study"].values() if study_matches(row)]
    for level in ("series", "instance")[: LEVELS.index(query.level)]:
        rows = [
            child
            for row in rows
            for child in row.children
            if all(c.matches(child.attrs.get(c.keyword)) for c in by_level[level])
        ]
    rows = view.ordered(query.level, rows)
    page = min(limit if limit is not None else MAX_RESULTS, MAX_RESULTS)
    selected = rows[offset : offset + page]
    warning = len(rows) - offset > page and (limit is None or limit > MAX_RESULTS)
    returned = _returned(query.level, scope, list(params), includes, include_all)
    return Expected(200, [_result(world, query.level, row, returned, base_url) for row in selected], warning)


_LEVEL_OF = {k: level for level in LEVELS for k in LEVEL_COLUMNS[level]}
_LEVEL_OF.update({k: "study" for k in COMPUTED["study"]})


def _keyword(name: str) -> str:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return str(keyword_for_tag(int(name, 16)))
    return name


def _returned(
    level: str, scope: dict[str, str], matched: list[str], includes: list[str], every: bool
) -> list[str]:
    """PS3.18 10.6.3.3: the level's defaults, those of the levels above it when the path does not
    name them, the matching keys, what includefield names (``all``: every attribute the index
    holds for the level and above)."""
    out = list(DEFAULTS[level])
    if level != "study" and "StudyInstanceUID" not in scope:
        out += DEFAULTS["study"]
    if level == "instance" and "SeriesInstanceUID" not in scope:
        out += DEFAULTS["series"]
    out += matched + includes
    if every:
        out += SELECTED[level]
    return list(dict.fromkeys(out))


def _result(world: World, level: str, row: Row, returned: list[str], base_url: str) -> dict[str, Any]:
    out: dict[str, Any] = {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}}
    stored: dict[str, Any] | None = None
    for keyword in returned:
        if keyword in SELECTED[level]:
            value = row.get(keyword)
            if keyword == "ModalitiesInStudy":
                out[tag(keyword)] = {"vr": "CS", "Value": value} if value else {"vr": "CS"}
            else:
                out[tag(keyword)] = element(keyword, value)
        else:  # from the stored JSON of the result's first instance, in retrieval order
            if stored is None:
                stored = world.stored_body(row.first)
            out[tag(keyword)] = stored.get(tag(keyword), {"vr": vr(keyword)})
    uids = []
    node: Row | None = row
    while node is not None:
        uids.append(node.uid)
        node = node.parent
    segments = ("/studies/", "/series/", "/instances/")
    out["00081190"] = {
        "vr": "UR",
        "Value": [base_url + "".join(s + u for s, u in zip(segments, reversed(uids)))],
    }
    return out
