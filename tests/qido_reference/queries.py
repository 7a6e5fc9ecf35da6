"""Random QIDO queries, as a viewer, a portal or a sync client might send them, and the check that
runs them through the HTTP app and compares each answer with the reference's (``matching``)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.synthetic import MODALITIES
from gateway.codec.attributes import MATCHING
from tests.qido_reference.matching import (
    HELD_AT,
    INTEGER_VRS,
    LEVELS,
    WILDCARD_VRS,
    Expected,
    Query,
    Row,
    answer,
    micros,
    name_words,
    view_of,
)
from tests.qido_reference.world import UID_ROOT, World, fold, tag, vr

__all__ = ["random_query", "check", "Report"]

# Attributes the index does not hold, returned from the stored JSON of a result's first instance.
EXTRAS = {"study": ("InstitutionName",), "series": ("ProtocolName",), "instance": ("ImageComments",)}
ABSENT = "StationName"  # held by no instance: includefield returns it empty


# -- random queries ------------------------------------------------------------------------------------


def random_query(world: World, rng: random.Random) -> Query:
    """A query a viewer, a portal or a sync client might send, with values drawn from what the
    registry holds (most match something) or made up (some match nothing)."""
    view = view_of(world)
    level = rng.choices(LEVELS, (5, 3, 3))[0]
    instance = view.rows["instance"][rng.choice(list(view.rows["instance"]))]
    series, study = instance.parent, instance.parent.parent  # type: ignore[union-attr]
    assert series is not None and study is not None
    scope: list[tuple[str, str]] = []
    if level != "study" and rng.random() < 0.6:
        if rng.random() < 0.05:  # a study the sources no longer hold (404), or a series of another
            gone = [s.uid for s in world.studies if s.uid not in view.rows["study"]]
            scope.append(("StudyInstanceUID", rng.choice(gone) if gone else f"{UID_ROOT}.404"))
            series = view.rows["series"][rng.choice(list(view.rows["series"]))]
        else:
            scope.append(("StudyInstanceUID", study.uid))
        if level == "instance" and rng.random() < 0.6:
            scope.append(("SeriesInstanceUID", series.uid))
    params: list[tuple[str, str]] = []
    keys = [k for k in MATCHING[level] if rng.random() < 0.5] if rng.random() < 0.1 else []
    # Keys whose matching has most to get wrong (names, text with wildcards) come up more often.
    weights = [3 if vr(k) in ("PN", "LO", "SH") else 1 for k in MATCHING[level]]
    keys += rng.choices(MATCHING[level], weights, k=rng.choice((0, 1, 1, 1, 2, 2, 3)))
    for keyword in dict.fromkeys(keys):
        value = _random_value(keyword, instance, rng)
        name = tag(keyword) if rng.random() < 0.2 else keyword
        params.append((name, value))
    if rng.random() < 0.25:
        params.append(("fuzzymatching", rng.choice(("true", "true", "false"))))
    if rng.random() < 0.5:
        pool = [k for lv in LEVELS for k in HELD_AT[lv] + EXTRAS[lv]] + [ABSENT]
        fields = [tag(k) if rng.random() < 0.3 else k for k in rng.sample(pool, rng.randint(1, 4))]
        if rng.random() < 0.15:
            fields.append("all")
        params.append(("includefield", ",".join(fields)))
    if rng.random() < 0.6:
        params.append(("limit", str(rng.choice((0, 1, 2, 3, 5, 10, 101, 1000, 1001, 5000)))))
    if rng.random() < 0.4:
        params.append(("offset", str(rng.choice((0, 1, 2, 5, 20, 100, 999, 1000, 5000)))))
    rng.shuffle(params)
    return Query(level, tuple(scope), tuple(params))


def _random_value(keyword: str, row: Row, rng: random.Random) -> str:
    kind = vr(keyword)
    if keyword == "ModalitiesInStudy":
        held = row.get("ModalitiesInStudy") or ["CT"]
        choice = rng.random()
        if choice < 0.5:
            return rng.choice(held)
        if choice < 0.75:
            return ",".join(rng.sample(list(MODALITIES), 2))
        return rng.choice(("C*", "?R", "*", "", "XA"))
    value = row.get(keyword)
    if rng.random() < 0.08:
        return ""  # universal matching
    if kind == "UI":
        uid = value or f"{UID_ROOT}.1"
        extra = f"{UID_ROOT}.{rng.randrange(10**6)}"
        if rng.random() < 0.3:
            return rng.choice((",", "\\")).join([uid, extra, f"{UID_ROOT}.{rng.randrange(10**6)}"])
        return uid if rng.random() < 0.9 else extra
    if kind == "DA":
        day = value or f"20{rng.randint(15, 24)}0615"
        other = f"20{rng.randint(15, 24)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        low, high = sorted((day, other))
        return rng.choice((day, f"{low}-{high}", f"{day}-", f"-{day}", f"{low}-{high}"))
    if kind == "TM":
        at = micros(value) if value else rng.randrange(86400 * 10**6)
        assert at is not None
        hh, mm, ss = at // 3_600_000_000, at // 60_000_000 % 60, at // 10**6 % 60
        forms = [
            f"{hh:02d}",
            f"{hh:02d}{mm:02d}",
            f"{hh:02d}{mm:02d}{ss:02d}",
            f"{hh:02d}{mm:02d}{ss:02d}.{at % 10**6:06d}"[: rng.randint(8, 13)],
        ]
        single = rng.choice(forms)
        other = f"{rng.randint(0, 23):02d}{rng.randint(0, 59):02d}"
        return rng.choice(
            (single, single, f"{min(single, other)}-{max(single, other)}", f"{single}-", f"-{single}")
        )
    if kind in INTEGER_VRS:
        number = value if value is not None else rng.randint(1, 12)
        return rng.choice((str(number), str(number), f"0{number}", f"+{number}", str(number + 1)))
    text = value if isinstance(value, str) else None
    if kind == "PN":
        if text is None:
            return rng.choice(("MARTIN", "dup*", "^Marie"))
        text = text.split("=")[0] if rng.random() < 0.3 else text
        family = text.split("^")[0]
        choice = rng.random()
        if choice < 0.25:
            return rng.choice((text, text.upper(), fold(text), text.lower()))
        if choice < 0.55:
            return rng.choice(
                (
                    family[: rng.randint(1, len(family))] + "*",
                    "*" + family[-3:],
                    family[:2] + "?" + family[3:] + "*",
                )
            )
        words = name_words(text)  # fuzzy matching: starts of words, in any order
        return " ".join(
            w[: rng.randint(1, len(w))] for w in rng.sample(words, min(len(words), rng.randint(1, 2)))
        )
    if text is None:
        return rng.choice(("*", "?", "A*", "CHEST"))
    choice = rng.random()
    if choice < 0.5 or kind not in WILDCARD_VRS:
        return text
    if choice < 0.6 and kind == "CS":
        return ",".join((text, "OTHER"))
    cut = rng.randint(0, len(text))
    special = [i + 1 for i, c in enumerate(text) if c in "[]%_"]
    if special and rng.random() < 0.5:  # patterns holding GLOB's and LIKE's own special characters
        cut = rng.choice(special)
    return rng.choice(
        (text[:cut] + "*", "*" + text[cut:], text[:cut] + "?" * min(2, len(text) - cut) + "*", "*")
    )


# -- the check -----------------------------------------------------------------------------------------


@dataclass
class Report:
    queries: int = 0
    mismatches: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    results: int = 0  # results compared, over every query
    empty: int = 0  # queries answered with nothing
    gateway_seconds: list[float] = field(default_factory=list)
    reference_seconds: list[float] = field(default_factory=list)
    slowest: list[tuple[float, str]] = field(default_factory=list)  # the gateway's, with the request

    def note(self, seconds: float, request: str) -> None:
        self.slowest = sorted([*self.slowest, (seconds, request)], reverse=True)[:5]


class Client(Protocol):
    def get(self, url: str, **kwargs: Any) -> Any: ...


def check(world: World, client: Client, queries: int, seed: int) -> Report:
    """``queries`` random queries through ``client`` (the HTTP app), each compared with ``answer``."""
    rng = random.Random(seed)
    report = Report()
    for _ in range(queries):
        query = random_query(world, rng)
        started = time.perf_counter()
        expected = answer(world, query)
        report.reference_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        response = client.get(query.url, params=list(query.params))
        report.gateway_seconds.append(time.perf_counter() - started)
        report.note(report.gateway_seconds[-1], f"GET {query.url}?{_query_string(query)}")
        report.queries += 1
        report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
        report.results += len(expected.items)
        report.empty += expected.status == 200 and not expected.items
        problem = _difference(expected, response)
        if problem:
            report.mismatches.append(f"GET {query.url}?{_query_string(query)}: {problem}")
    return report


def _query_string(query: Query) -> str:
    return "&".join(f"{k}={v}" for k, v in query.params)


def _difference(expected: Expected, response: Any) -> str | None:
    if response.status_code != expected.status:
        return f"status {response.status_code}, expected {expected.status}: {response.text[:200]}"
    if expected.status != 200:
        return None
    got = response.json()
    if ("Warning" in response.headers) != expected.warning:
        return f"Warning header {'sent' if expected.warning is False else 'missing'}"
    if len(got) != len(expected.items):
        return (
            f"{len(got)} results, expected {len(expected.items)}: "
            f"first {_uids(got)[:3]} vs {_uids(expected.items)[:3]}"
        )
    for index, (mine, theirs) in enumerate(zip(got, expected.items)):
        if mine != theirs:
            tags = sorted(set(mine) | set(theirs))
            diff = [f"{t}: {mine.get(t)} != {theirs.get(t)}" for t in tags if mine.get(t) != theirs.get(t)]
            return f"result {index}: " + "; ".join(diff[:4])
    return None


def _uids(items: list[dict[str, Any]]) -> list[str]:
    for key in ("00080018", "0020000E", "0020000D"):
        if items and key in items[0]:
            return [(item[key].get("Value") or [None])[0] for item in items]
    return []
