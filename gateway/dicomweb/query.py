"""QIDO-RS query parameters (PS3.18 8.3.4, 10.6.1) to a ``Query``, and what its results carry.

Pure: query parameters (already percent-decoded) in, a ``gateway.types.Query`` or a ``QueryError``
(400) out; no request, no database. The registry compiles the query to SQL
(``gateway.registry.qido``).

Matching keys and ``includefield`` entries are DICOM keywords or tags (8 hex digits), several to a
parameter when comma-separated (what OHIF sends: ``includefield=00081030,00080060``). Values are
single values, wildcards ``*`` and ``?``, UID and CS lists, DA/TM ranges, or universal (empty, or
``*`` alone) (PS3.4 C.2.2.2). A key that is not understood is a 400 naming it, never skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from gateway.codec.attributes import COMPUTED, DEFAULTS, LEVEL_COLUMNS, MATCHING, resolve_attribute, vr_of
from gateway.errors import QueryError
from gateway.registry.qido import fuzzy_words
from gateway.registry.record import fold_text
from gateway.types import Level, Match, Query, Restriction

__all__ = [
    "parse_qido", "returned",
    "MAX_LIMIT", "MAX_OFFSET", "MAX_VALUE_LENGTH", "MAX_LIST", "MAX_FUZZY_WORDS", "MAX_INCLUDEFIELDS",
]  # fmt: skip

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
_LEVELS: dict[str, Level] = {"study": "study", "series": "series", "instance": "instance"}
_LEVELS_FROM_TOP = {  # a level and those above it, for includefield=all
    "study": ("study",),
    "series": ("study", "series"),
    "instance": ("study", "series", "instance"),
}
_WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}  # PS3.4 C.2.2.2.4
# fullmatch everywhere: "$" would let a trailing newline through, "\d" any Unicode digit.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_DATE = re.compile(r"[0-9]{8}")
_TIME = re.compile(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?")
_DIGITS = re.compile(r"[0-9]+")
_INTEGER = re.compile(r" *[+-]?[0-9]{1,12} *")  # IS: at most 12 characters, spaces allowed
_ATTRIBUTE = re.compile(r"[0-9A-Fa-f]{8}|[A-Za-z][A-Za-z0-9]{0,63}")  # a tag or a keyword
_LIST_SEPARATORS = re.compile(r"[,\\]")


def parse_qido(
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    level: str,
    scope: Mapping[str, str] | None = None,
    restriction: Restriction | None = None,
) -> Query:
    """The query that ``params`` ask for at ``level`` ("study", "series" or "instance") under the
    UIDs of the path (``scope``), for a caller who may see ``restriction`` (None: everything).

    ``params``: (name, value) pairs, a repeated name given once per value (a multidict's
    ``multi_items()``); a plain mapping is taken as such pairs. Raises ``QueryError`` (400) for what
    cannot be understood and for what is past one of the bounds above, naming the parameter and
    the bound."""
    if isinstance(params, Mapping):
        # A multidict (starlette's QueryParams) keeps one value a name in items(): its repeats
        # must be seen, to be refused.
        params = getattr(params, "multi_items", params.items)()
    at = _LEVELS[level]
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
            if keyword not in MATCHING[at]:
                raise QueryError(f"{name}: not supported as a matching key at {at} level")
            if keyword in matches:
                raise QueryError(f"{name}: given more than once")
            matches[keyword] = _match(keyword, value)
    if fuzzy:
        for match in matches.values():
            if vr_of(match.keyword) == "PN" and match.values:
                if len(fuzzy_words(fold_text(match.values[0]))) > MAX_FUZZY_WORDS:
                    raise QueryError(
                        f"{match.keyword}: at most {MAX_FUZZY_WORDS} words with fuzzymatching=true"
                    )
    return Query(
        at,
        tuple(matches.values()),
        tuple(includefields),
        include_all,
        fuzzy,
        limit,
        offset,
        dict(scope or {}),
        restriction,
    )


def returned(query: Query) -> tuple[str, ...]:
    """The attributes each result carries (PS3.18 10.6.3.3): the level's defaults (and those of
    the levels above that the path does not fix), the matching keys, the includefields, then,
    for ``includefield=all``, every attribute the index holds at the level and above."""
    out = list(DEFAULTS[query.level])
    if query.level != "study" and "StudyInstanceUID" not in query.scope:
        out += [k for k in DEFAULTS["study"] if k not in out]  # PS3.18 10.6.3.3.2
    if query.level == "instance" and "SeriesInstanceUID" not in query.scope:
        out += [k for k in DEFAULTS["series"] if k not in out]
    for keyword in [m.keyword for m in query.matches] + list(query.includefields):
        if keyword not in out:
            out.append(keyword)
    if query.include_all:
        for name in _LEVELS_FROM_TOP[query.level]:
            out += [k for k in LEVEL_COLUMNS[name] + COMPUTED[name] if k not in out]
    return tuple(out)


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
