"""A study query by patient name finds the patients first when few match, and walks the studies
in date order when many do (``plan_query``); both give the same page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.dicomweb.query import parse_qido
from gateway.registry.qido import compile_query, names_first_below
from gateway.registry.record import record_from_json
from gateway.registry.search import plan_query
from gateway.registry.store import Harvested, Registry
from tests.backends import Databases

PATIENTS = 400  # one study each; every other patient is a MARTIN, one is ZOLA


def _body(number: int) -> dict[str, Any]:
    family = "ZOLA" if number == 7 else "MARTIN" if number % 2 == 0 else f"NAME{number:03d}"
    uid = f"1.2.826.0.1.3680043.2.1125.7.{number}"

    def e(vr: str, value: Any) -> dict[str, Any]:
        return {"vr": vr, "Value": [value]}

    return {
        "00100010": e("PN", {"Alphabetic": f"{family}^Anne"}),
        "00100020": e("LO", f"P{number:04d}"),
        "00080020": e("DA", f"2020{1 + number % 12:02d}{1 + number % 28:02d}"),
        "00080030": e("TM", f"{number % 24:02d}0000"),
        "00080060": e("CS", "CT"),
        "0020000D": e("UI", uid),
        "0020000E": e("UI", uid + ".1"),
        "00080018": e("UI", uid + ".1.1"),
    }


@pytest.fixture
def registry(tmp_path: Path, registry_urls: Databases) -> Iterator[Registry]:
    registry = Registry(registry_urls.url(tmp_path / "registry.db"))
    items = [Harvested(f"{n}.dcm", 1, 1, record_from_json(_body(n))) for n in range(PATIENTS)]
    with registry.transaction() as conn:
        registry.put_instances(conn, "src", items)
    registry.analyze()  # the planner's figures the choice is made from
    yield registry
    registry.close()


def _names_first(registry: Registry, sql: str) -> bool:
    return ("+st.StudyDate" if registry.dialect == "sqlite" else "(st.StudyDate || '')") in sql


def test_a_name_few_patients_have_finds_the_patients_first(registry):
    sql, _, _ = plan_query(registry, parse_qido([("PatientName", "ZOL*"), ("limit", "10")], "study"))
    assert _names_first(registry, sql)


def test_a_name_many_patients_have_walks_the_studies_in_date_order(registry):
    sql, _, _ = plan_query(registry, parse_qido([("PatientName", "MART*"), ("limit", "10")], "study"))
    assert not _names_first(registry, sql)


@pytest.mark.parametrize("name", ["MART*", "ZOL*", "NAME1*"])
def test_both_plans_answer_the_same_page_newest_first(registry, name):
    query = parse_qido([("PatientName", name), ("limit", "10"), ("offset", "3")], "study")
    pages = []
    for names_first in (True, False):
        sql, params, _ = compile_query(query, registry.dialect, names_first)
        pages.append([(row["StudyDate"], row["StudyInstanceUID"]) for row in registry.query(sql, params)])
    assert pages[0] == pages[1]
    assert [date for date, _ in pages[0]] == sorted((date for date, _ in pages[0]), reverse=True)


def test_the_threshold_is_where_both_plans_read_as_many_studies():
    # 20,646 patients, 34,004 studies (1,000,000 instances in bench/scale.py), a page of 102.
    below = names_first_below(20646, 34004, 102)
    fraction = below / 20646
    assert 102 / fraction == pytest.approx(fraction * 34004, rel=0.01)
    assert names_first_below(0, 0, 102) > 10**6  # not analyzed yet: the name index
