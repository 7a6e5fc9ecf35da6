"""QIDO-RS queries: parse the query string into a ``Query`` (pure), compile it to SQL (pure).

Matching follows PS3.18 8.3.4 and PS3.4 C.2.2.2: single value, wildcards ``*`` and ``?``, UID lists,
DA/TM ranges, universal (empty, or ``*`` alone) matching; person names match case- and
accent-insensitively, and with ``fuzzymatching=true`` each word of the query matches the start of a
word of the name (its components split at spaces: ``gall`` finds ``LE GALL^MARIE``). Every value is
a bound parameter; column names come only from the attribute catalogue.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.codec.attributes import (
    DEFAULTS,
    INSTANCE,
    MATCHING,
    PATIENT,
    SERIES,
    STUDY,
    resolve_attribute,
    vr_of,
)
from gateway.errors import QueryError
from gateway.registry.record import INS_ISSUERS, fold_text, normalize_time
from gateway.registry.schema import SERIES_COLUMNS
from gateway.types import Restriction

__all__ = [
    "Match", "Query", "parse_qido", "compile_query", "MAX_RESULTS",
    "name_match", "count_named", "names_first_below",
]  # fmt: skip

MAX_RESULTS = 1000  # a larger page is cut, with a Warning header (PS3.18 8.3.4.4)

# Bounds on what a query may ask (a 400 naming the parameter and the bound past them): far above
# what a viewer sends (OHIF: limit=101, a few includefields, a name of a word or two), far below
# what would cost the database (SQLite refuses an expression tree deeper than 1,000 terms and more
# than 32,766 bound parameters; PostgreSQL 65,535 parameters).
MAX_LIMIT = 2**31 - 1  # accepted, and answered with at most MAX_RESULTS (and a Warning when cut)
MAX_OFFSET = 100_000  # the database walks every skipped row
MAX_VALUE_LENGTH = 1024  # characters of one matching value (ST's own bound, PS3.5 6.2)
MAX_LIST = 1000  # values in a UID or CS value list
MAX_FUZZY_WORDS = 16  # words of a name matched with fuzzymatching=true, each one a condition
MAX_INCLUDEFIELDS = 256  # includefield entries, all includefield parameters together
_INTEGERS = {  # PS3.5 6.2: the range of each integer VR among the matching keys
    "IS": (-(2**31), 2**31 - 1),
    "SL": (-(2**31), 2**31 - 1),
    "SS": (-(2**15), 2**15 - 1),
    "UL": (0, 2**32 - 1),
    "US": (0, 2**16 - 1),
}
_INLINE = 64  # a restriction with more values is bound as one array parameter (see _in)
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield"}
_WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}  # PS3.4 C.2.2.2.4
# fullmatch everywhere: "$" would let a trailing newline through, "\d" any Unicode digit.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_DATE = re.compile(r"[0-9]{8}")
_TIME = re.compile(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?")
_DIGITS = re.compile(r"[0-9]+")
_INTEGER = re.compile(r" *[+-]?[0-9]{1,12} *")  # IS: at most 12 characters, spaces allowed
_ATTRIBUTE = re.compile(r"[0-9A-Fa-f]{8}|[A-Za-z][A-Za-z0-9]{0,63}")  # a tag or a keyword
_LIST_SEPARATORS = re.compile(r"[,\\]")
_WORD_SEPARATORS = re.compile(r"[\s^=,*?]+")


@dataclass(frozen=True)
class Match:
    keyword: str
    kind: str  # "single" | "wildcard" | "list" | "range" | "universal"
    values: tuple[str, ...]


@dataclass(frozen=True)
class Query:
    level: str  # "study" | "series" | "instance"
    matches: tuple[Match, ...] = ()
    includefields: tuple[str, ...] = ()
    include_all: bool = False
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0
    scope: dict[str, str] = field(default_factory=dict)  # UIDs from the path
    restriction: Restriction | None = None  # None: the caller sees every study

    @property
    def returned(self) -> tuple[str, ...]:
        """The attributes each result carries: defaults, matched keys, then includefields."""
        out = list(DEFAULTS[self.level])
        if self.level != "study" and "StudyInstanceUID" not in self.scope:
            out += [k for k in DEFAULTS["study"] if k not in out]  # PS3.18 10.6.3.3.2
        if self.level == "instance" and "SeriesInstanceUID" not in self.scope:
            out += [k for k in DEFAULTS["series"] if k not in out]
        for keyword in [m.keyword for m in self.matches] + list(self.includefields):
            if keyword not in out:
                out.append(keyword)
        return tuple(out)


def parse_qido(params: Iterable[tuple[str, str]], level: str, scope: dict[str, str] | None = None) -> Query:
    """Parse query parameters (already percent-decoded) for a query at ``level``. Raises
    ``QueryError`` (400) for what cannot be understood and for what is past one of the bounds
    above, naming the parameter and the bound."""
    matches: dict[str, Match] = {}
    includefields: list[str] = []
    entries = 0  # includefield entries seen
    include_all = False
    fuzzy = False
    limit: int | None = None
    offset = 0
    given: set[str] = set()  # control parameters, each given once
    for name, value in params:
        if name in ("fuzzymatching", "limit", "offset"):
            if name in given:
                raise QueryError(f"{name}: given more than once")
            given.add(name)
        if name == "includefield":
            items = [v.strip() for v in value.split(",", MAX_INCLUDEFIELDS)]
            entries += max(1, len(items))
            if entries > MAX_INCLUDEFIELDS:
                raise QueryError(f"includefield: at most {MAX_INCLUDEFIELDS} attributes in one query")
            for item in filter(None, items):
                if item == "all":
                    include_all = True
                    continue
                keyword = _attribute(item, "includefield")
                if keyword not in includefields:
                    includefields.append(keyword)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise QueryError(f"fuzzymatching: expected true or false, got {_shown(value)}")
            fuzzy = value == "true"
        elif name == "limit":
            limit = _count(name, value, MAX_LIMIT)
        elif name == "offset":
            offset = _count(name, value, MAX_OFFSET)
        else:
            keyword = _attribute(name, "query key")
            if keyword not in MATCHING[level]:
                raise QueryError(f"{name}: not supported as a matching key at {level} level")
            if keyword in matches:
                raise QueryError(f"{name}: given more than once")
            matches[keyword] = _match(keyword, value)
    if fuzzy:
        for match in matches.values():
            if vr_of(match.keyword) == "PN" and match.values:
                if len(_words(fold_text(match.values[0]))) > MAX_FUZZY_WORDS:
                    raise QueryError(
                        f"{match.keyword}: at most {MAX_FUZZY_WORDS} words with fuzzymatching=true"
                    )
    return Query(
        level,
        tuple(matches.values()),
        tuple(includefields),
        include_all,
        fuzzy,
        limit,
        offset,
        dict(scope or {}),
    )


def _shown(text: str, room: int = 64) -> str:
    """``text`` for a message: quoted, and cut when long (a message must not echo a megabyte)."""
    if len(text) <= room:
        return repr(text)
    return f"{text[:room]!r}... ({len(text)} characters)"


def _key(name: str) -> str:
    """A query key for a message: as given when short and printable, else as ``_shown``."""
    return name if len(name) <= 64 and name.isprintable() else _shown(name)


def _count(name: str, value: str, maximum: int) -> int:
    """limit and offset: a non-negative integer up to ``maximum``."""
    if not _DIGITS.fullmatch(value):
        raise QueryError(f"{name}: expected a non-negative integer, got {_shown(value)}")
    digits = value.lstrip("0") or "0"
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        raise QueryError(f"{name}: at most {maximum}, got {_shown(value, 24)}")
    return int(digits)


def _attribute(name: str, what: str) -> str:
    if "." in name:
        raise QueryError(f"{_key(name)}: sequence attribute paths are not supported as {what}")
    keyword = resolve_attribute(name) if _ATTRIBUTE.fullmatch(name) else None
    if keyword is None:
        raise QueryError(f"{_key(name)}: unknown attribute (expected a DICOM keyword or 8 hex digits)")
    return keyword


def _words(folded: str) -> list[str]:
    """The words of a name that fuzzy matching looks for (each must begin a word of the name)."""
    return [word for word in _WORD_SEPARATORS.split(folded) if word]


def _list(keyword: str, value: str) -> tuple[str, ...]:
    if value.count(",") + value.count("\\") >= MAX_LIST:
        raise QueryError(f"{keyword}: at most {MAX_LIST} values in a list")
    values = tuple(v for v in _LIST_SEPARATORS.split(value) if v)
    if not values:
        raise QueryError(f"{keyword}: {_shown(value)} is a list without values")
    for item in values:
        if len(item) > MAX_VALUE_LENGTH:
            raise QueryError(f"{keyword}: at most {MAX_VALUE_LENGTH} characters in a value")
    return values


def _match(keyword: str, value: str) -> Match:
    vr = vr_of(keyword)
    if value == "":
        return Match(keyword, "universal", ())
    if vr == "UI":
        uids = _list(keyword, value)
        for uid in uids:
            if len(uid) > 64 or not _UID.fullmatch(uid):
                raise QueryError(f"{keyword}: {_shown(uid)} is not a UID")
        return Match(keyword, "list" if len(uids) > 1 else "single", uids)
    if vr == "CS" and ("," in value or "\\" in value):
        return Match(keyword, "list", _list(keyword, value))
    if len(value) > MAX_VALUE_LENGTH:
        raise QueryError(f"{keyword}: at most {MAX_VALUE_LENGTH} characters in a value")
    if vr in ("DA", "TM"):
        pattern = _DATE if vr == "DA" else _TIME
        if "-" in value:
            low, _, high = value.partition("-")
            for part in (low, high):
                if part and not pattern.fullmatch(part):
                    raise QueryError(f"{keyword}: {_shown(value)} is not a {vr} range")
            if not low and not high:
                raise QueryError(f"{keyword}: an empty range")
            return Match(keyword, "range", (low, high))
        if not pattern.fullmatch(value):
            raise QueryError(f"{keyword}: {_shown(value)} is not a valid {vr} value")
        return Match(keyword, "single", (value,))
    if vr in _INTEGERS:
        least, most = _INTEGERS[vr]
        if not _INTEGER.fullmatch(value) or not least <= int(value) <= most:
            raise QueryError(
                f"{keyword}: expected an integer from {least} to {most} ({vr}), got {_shown(value)}"
            )
        return Match(keyword, "single", (str(int(value)),))
    if vr in _WILDCARD_VRS and ("*" in value or "?" in value):
        if not value.strip("*"):
            # PS3.4 C.2.2.2.4: "*" matches any value, a zero-length one included (its Note: the
            # same as universal matching); a pattern never matches an absent column (NULL).
            return Match(keyword, "universal", ())
        return Match(keyword, "wildcard", (value,))
    return Match(keyword, "single", (value,))


# -- SQL ---------------------------------------------------------------------------------------

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
        _restrict(query.restriction, where, params, dialect)
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


def _restrict(restriction: Restriction, where: list[str], params: list[Any], dialect: str) -> None:
    # What the caller may not see is left out silently (the access policy's rule for QIDO).
    for column_name, values, negate in (
        ("p.INS", restriction.patients, False),
        ("st.StudyInstanceUID", restriction.studies, False),
        ("st.StudyInstanceUID", restriction.hidden or None, True),
    ):
        if values is None:
            continue
        if not values:
            where.append("1 = 0")  # nothing is visible
            continue
        where.append(_in(column_name, sorted(values), negate, dialect, params))


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
    col: str, kind: str, value: str, fuzzy: bool, where: list[str], params: list[Any]
) -> None:
    folded = fold_text(value)
    if fuzzy:
        # Each query word must begin some word of the name (of its family, given, ... components,
        # split at spaces too, so that "gall" finds "LE GALL"): for the patient's name, a prefix
        # search in its word table (an index range).
        for word in _words(folded):
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
