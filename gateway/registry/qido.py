"""QIDO-RS queries to SQL (pure): a ``gateway.types.Query`` (parsed from the query string by
``gateway.dicomweb.query``) compiled to one SELECT with bound parameters.

Matching follows PS3.18 8.3.4 and PS3.4 C.2.2.2: single value, wildcards ``*`` and ``?``, UID lists,
DA/TM ranges, universal (empty, or ``*`` alone) matching; person names match case- and
accent-insensitively, and with ``fuzzymatching=true`` each word of the query matches the start of a
word of the name (its components split at spaces: ``gall`` finds ``LE GALL^MARIE``). Every value is
a bound parameter; column names come only from the attribute catalogue.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.codec.attributes import INSTANCE, PATIENT, SERIES, STUDY, vr_of
from gateway.registry.record import INS_ISSUERS, fold_text, normalize_time
from gateway.registry.schema import SERIES_COLUMNS
from gateway.types import Match, MatchKind, Query, Restriction

__all__ = [
    "compile_query", "MAX_RESULTS", "fuzzy_words",
    "name_match", "count_named", "names_first_below", "restricted",
]  # fmt: skip

MAX_RESULTS = 1000  # a larger page is cut, with a Warning header (PS3.18 8.3.4.4)

_INLINE = 64  # a restriction with more values is bound as one array parameter (see _in)
_WORD_SEPARATORS = re.compile(r"[\s^=,*?]+")


def fuzzy_words(folded: str) -> list[str]:
    """The words of a (folded) name that fuzzy matching looks for: each must begin a word of the
    name, and each is one condition of the query."""
    return [word for word in _WORD_SEPARATORS.split(folded) if word]


_ALIAS = {**{k: "p" for k in PATIENT}, **{k: "st" for k in STUDY}, **{k: "se" for k in SERIES}}
_FROM = {
    "study": "studies st JOIN patients p ON p.id = st.patient",
    "series": "series se JOIN studies st ON st.StudyInstanceUID = se.StudyInstanceUID "
    "JOIN patients p ON p.id = st.patient",
    "instance": "instances i JOIN series se ON se.SeriesInstanceUID = i.SeriesInstanceUID "
    "JOIN studies st ON st.StudyInstanceUID = se.StudyInstanceUID "
    "JOIN patients p ON p.id = st.patient",
}
_ORDER = {
    "study": "st.StudyDate DESC, st.StudyTime_norm DESC, st.StudyInstanceUID",
    "series": "se.SeriesNumber, se.SeriesInstanceUID",
    "instance": "i.InstanceNumber, i.SOPInstanceUID",
}
_SERIES_COLUMNS = tuple(c for c in SERIES_COLUMNS if c != "StudyInstanceUID") + (
    "NumberOfSeriesRelatedInstances",
)
# Every instance column, by the catalogue: a list of its own left ContentDate and ContentTime out,
# and they were never returned, not even as the matching key (PS3.18 10.6.3.3; PS3.4 C.2.2.1: a key
# given a value is matched and returned).
_INSTANCE_FIELDS = INSTANCE
_UNINDEXED_DATE = "(st.StudyDate || '')"  # the same order, which PostgreSQL cannot read off an index
_TIME_COLUMNS = {"StudyTime", "SeriesTime", "ContentTime", "PerformedProcedureStepStartTime"}


def column(keyword: str) -> str:
    return f"{_ALIAS.get(keyword, 'i')}.{keyword}"


def compile_query(
    query: Query, dialect: str = "sqlite", names_first: bool = True
) -> tuple[str, list[Any], int]:
    """SQL selecting the matching rows' columns and computed attributes; returns the effective
    limit too (at most ``MAX_RESULTS``). ``dialect``: "sqlite" or "postgresql". ``names_first``:
    for a study query by patient name, find the patients by name before their studies (see
    ``names_first_below``), rather than walk the studies in date order."""
    where: list[str] = []
    params: list[Any] = []
    for keyword, uid in query.scope.items():
        where.append(f"{column(keyword)} = ?")
        params.append(uid)
    for match in _patient_identity(query.matches, where, params):
        _condition(match, query.fuzzy, where, params)
    if query.restriction is not None:
        where += restricted(query.restriction, "p.INS", "st.StudyInstanceUID", dialect, params)
    # The computed attributes (counts, ModalitiesInStudy) are columns kept by the registry's
    # writes: worked out per answer, they were most of a 1,000-result page's SQL.
    selects = ["p.*", "st.*"]
    if query.level != "study":
        # Named one by one: se.* would repeat StudyInstanceUID.
        selects += [f"se.{name}" for name in _SERIES_COLUMNS]
    if query.level == "instance":
        selects += [f"i.{name}" for name in _INSTANCE_FIELDS]
    limit = min(query.limit if query.limit is not None else MAX_RESULTS, MAX_RESULTS)
    order = _ORDER[query.level]
    if names_first and name_match(query) is not None:
        # Left to themselves, both databases walk the studies in date order testing each one's
        # patient's name until the page is full: at 1,000,000 instances 30 ms on SQLite for a
        # prefix that matches nobody, 14-25 ms on PostgreSQL for one that matches a few hundred
        # patients. Keeping the date index out of the ordering (SQLite: a unary +; PostgreSQL:
        # an expression of the same order) makes the name index find the patients first.
        order = "+" + order if dialect == "sqlite" else order.replace("st.StudyDate", _UNINDEXED_DATE, 1)
    sql = (
        f"SELECT {', '.join(selects)} FROM {_FROM[query.level]}"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" ORDER BY {order} LIMIT ? OFFSET ?"
    )
    params += [limit + 1, query.offset]  # one more row tells whether the page was cut
    sql, params = _in_dialect(sql, params, dialect)
    return sql, params, limit


def _in_dialect(sql: str, params: list[Any], dialect: str) -> tuple[str, list[Any]]:
    if dialect == "postgresql":
        # Wildcards are built as GLOB patterns (case-sensitive, '*' '?'), PostgreSQL's LIKE is
        # the same match with '%' '_' (and a backslash escape).
        sql = sql.replace(" GLOB ?", " LIKE ?")
        params = [_like(p) if isinstance(p, _Glob) else p for p in params]
    return sql, params


def name_match(query: Query) -> Match | None:
    """The study query's match on the patient's name that its index can answer (a value, or a
    wildcard that does not start with one), if any."""
    if query.level != "study" or query.fuzzy:
        return None
    for match in query.matches:
        if (
            match.keyword == "PatientName"
            and match.kind in ("single", "wildcard")
            and not match.values[0].startswith(("*", "?"))
        ):
            return match
    return None


def count_named(match: Match, cap: int, dialect: str = "sqlite") -> tuple[str, list[Any]]:
    """SQL counting the patients ``match`` names, up to ``cap`` (an index range, bounded)."""
    where: list[str] = []
    params: list[Any] = []
    _name_condition("p.PatientName", match.kind, match.values[0], False, where, params)
    sql = f"SELECT COUNT(*) FROM (SELECT 1 FROM patients p WHERE {where[0]} LIMIT ?) named"
    return _in_dialect(sql, [*params, cap], dialect)


def names_first_below(patients: float, studies: float, page: int) -> int:
    """How few patients a name must match for finding them first to beat walking the studies in
    date order. Walking reads about ``page / f`` studies when a fraction ``f`` of them match;
    finding the patients first reads all ``f * studies`` that match and sorts them. They cost
    the same where ``f = sqrt(page / studies)``: at 1,000,000 instances (20,646 patients,
    34,004 studies) and a viewer's page, ~1,100 patients. There, on SQLite: "DAVI*" (300
    patients) 2.1 ms found first, 15.9 ms walking; "MART*" (1,857) 9.1 and 6.8 ms; "M*" (4,062)
    17.4 and 3.8 ms. PostgreSQL: "MART*" 22 ms found first (bench/scale.py)."""
    if studies <= 0 or patients <= 0:
        return 1 << 30  # no statistics yet: the name index, whose cost the count bounds anyway
    return max(1, int(patients * min(1.0, (page / studies) ** 0.5)))


def restricted(
    restriction: Restriction, patient: str, study: str, dialect: str, params: list[Any]
) -> list[str]:
    """SQL conditions leaving out what the caller may not see, silently (the access policy's rule
    for lists: QIDO, the change feed, the patient's history), over the columns naming a study's
    patient INS and its StudyInstanceUID; ``["1 = 0"]`` when nothing is visible."""
    dimensions = (
        (patient, restriction.patients, False),
        (study, restriction.studies, False),
        (study, restriction.hidden or None, True),
    )
    if any(values is not None and not values for _, values, _ in dimensions):
        return ["1 = 0"]
    return [
        _in(column, sorted(values), negate, dialect, params)
        for column, values, negate in dimensions
        if values is not None
    ]


def _in(column_name: str, values: list[str], negate: bool, dialect: str, params: list[Any]) -> str:
    """``column IN (values)``. A long list (an organization's grants may cover thousands of
    patients) is one parameter, an array, rather than one parameter per value: SQLite takes at
    most 32,766 parameters in a statement and PostgreSQL 65,535."""
    if len(values) <= _INLINE:
        params.extend(values)
        return f"{column_name} {'NOT IN' if negate else 'IN'} ({','.join('?' * len(values))})"
    if dialect == "postgresql":
        params.append(values)  # psycopg sends a list as an array
        return f"{column_name} {'<> ALL' if negate else '= ANY'}(?)"
    params.append(orjson.dumps(values).decode())
    return f"{column_name} {'NOT IN' if negate else 'IN'} (SELECT value FROM json_each(?))"


def _patient_identity(matches: tuple[Match, ...], where: list[str], params: list[Any]) -> list[Match]:
    """A patient known by the national identifier (INS) at one site and by a local ID elsewhere is
    one person: ``PatientID=<INS>&IssuerOfPatientID=<INS OID>`` matches the INS of every site, and a
    single PatientID also matches an INS equal to it. The other matches are returned untouched."""
    by_key = {match.keyword: match for match in matches}
    patient, issuer = by_key.get("PatientID"), by_key.get("IssuerOfPatientID")
    if patient is None or patient.kind != "single":
        return list(matches)
    if issuer is not None and issuer.kind == "single" and issuer.values[0] in INS_ISSUERS:
        where.append("p.INS = ?")
        params.append(patient.values[0])
        return [m for m in matches if m not in (patient, issuer)]
    where.append("(p.PatientID = ? OR p.INS = ?)")
    params.extend([patient.values[0], patient.values[0]])
    return [m for m in matches if m is not patient]


def _condition(match: Match, fuzzy: bool, where: list[str], params: list[Any]) -> None:
    keyword, kind, values = match.keyword, match.kind, match.values
    if kind == "universal":
        return
    if keyword == "ModalitiesInStudy":
        inner: list[str] = []
        _condition(Match("Modality", kind, values), fuzzy, inner, params)
        where.append(
            "EXISTS (SELECT 1 FROM series m WHERE m.StudyInstanceUID = st.StudyInstanceUID"
            f" AND {inner[0].replace('se.', 'm.')})"
        )
        return
    col = column(keyword)
    vr = vr_of(keyword)
    if vr == "PN":
        _name_condition(col, kind, values[0], fuzzy, where, params)
        return
    if keyword in _TIME_COLUMNS:
        col += "_norm"
        if kind == "single":
            low, high = values[0], values[0]
            kind, values = "range", (low, high)
    if kind == "list":
        where.append(f"{col} IN ({', '.join('?' * len(values))})")
        params.extend(values)
    elif kind == "range":
        low, high = values
        if keyword in _TIME_COLUMNS:
            low = normalize_time(low) if low else ""
            high = _time_upper(high) if high else ""
        if low:
            where.append(f"{col} >= ?")
            params.append(low)
        if high:
            where.append(f"{col} <= ?")
            params.append(high)
    elif kind == "wildcard":
        where.append(f"{col} GLOB ?")
        params.append(_Glob(_glob(values[0])))
    elif vr in ("IS", "US", "UL", "SS", "SL"):
        where.append(f"{col} = ?")
        params.append(int(values[0]))
    else:
        where.append(f"{col} = ?")
        params.append(values[0])


def _name_condition(
    col: str, kind: MatchKind, value: str, fuzzy: bool, where: list[str], params: list[Any]
) -> None:
    folded = fold_text(value)
    if fuzzy:
        # Each query word must begin some word of the name (of its family, given, ... components,
        # split at spaces too, so that "gall" finds "LE GALL"): for the patient's name, a prefix
        # search in its word table (an index range).
        for word in fuzzy_words(folded):
            if col == "p.PatientName":
                where.append("p.id IN (SELECT w.patient FROM patient_words w WHERE w.word GLOB ?)")
                params.append(_Glob(f"{_glob_escape(word)}*"))
            else:
                where.append(f"{col}_words GLOB ?")
                params.append(_Glob(f"* {_glob_escape(word)}*"))
        return
    if kind == "wildcard":
        where.append(f"{col}_fold GLOB ?")
        params.append(_Glob(_glob(folded)))
    else:
        where.append(f"{col}_fold = ?")
        params.append(folded)


class _Glob(str):
    """A GLOB pattern among the parameters (PostgreSQL gets it as a LIKE pattern)."""


def _like(pattern: str) -> str:
    """A GLOB pattern as a LIKE pattern: '*' -> '%', '?' -> '_', '[c]' -> c; LIKE's own special
    characters escaped with a backslash (PostgreSQL's default escape)."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "[" and i + 2 < len(pattern) and pattern[i + 2] == "]":
            char, i = pattern[i + 1], i + 2
            out.append("\\" + char if char in "%_\\" else char)
        elif char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        else:
            out.append("\\" + char if char in "%_\\" else char)
        i += 1
    return "".join(out)


def _glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def _glob(pattern: str) -> str:
    """DICOM wildcards to GLOB: '*' and '?' keep their meaning, GLOB's '[' is escaped."""
    return re.sub(r"([\[\]])", r"[\1]", pattern)


def _time_upper(value: str) -> str:
    """The last instant a partial TM upper bound covers: '15' means up to 15:59:59.999999."""
    whole, _, fraction = value.partition(".")
    return whole + "5959"[len(whole) - 2 :] + "." + (fraction + "999999")[:6]
