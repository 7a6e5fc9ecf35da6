"""QIDO answers in their order without sorting everything they match (SQLite's plans: what
bench/scale.py found slow at 1,000,000 instances, held here on a registry small enough to build)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.synthetic import generate
from gateway.dicomweb.query import parse_qido
from gateway.registry.qido import compile_query
from gateway.registry.search import _FIRST_INSTANCE
from gateway.registry.store import Registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    path: Path = tmp_path_factory.mktemp("plans") / "registry.db"
    registry = Registry(path)
    generate(registry, 3000, seed=1)
    registry.analyze()  # as a harvest of that size does
    yield registry
    registry.close()


def _plan(registry: Registry, level: str, params: list[tuple[str, str]]) -> str:
    sql, values, _ = compile_query(parse_qido(params + [("limit", "10")], level), registry.dialect)
    return "\n".join(row[3] for row in registry.query("EXPLAIN QUERY PLAN " + sql, values))


@pytest.mark.parametrize("level", ["study", "series", "instance"])
def test_a_query_naming_nothing_reads_in_answer_order(registry, level):
    plan = _plan(registry, level, [])
    assert "TEMP B-TREE FOR ORDER BY" not in plan, plan


def test_a_name_prefix_finds_the_patients_by_their_name_index(registry):
    plan = _plan(registry, "study", [("PatientName", "MART*")])
    assert "patients_name" in plan, plan


@pytest.mark.parametrize(
    "level,table", [("study", "studies"), ("series", "series"), ("instance", "instances")]
)
def test_the_stored_json_of_a_page_is_found_by_index_seeks(registry, level, table):
    # Attributes read from the stored DICOM JSON (includefield=Modality at study level, as OHIF
    # sends it): one statement per page, each result's first instance found without a scan or sort.
    key = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}[level]
    uids = [row[0] for row in registry.query(f"SELECT {key} FROM {table} LIMIT 3")]
    sql = _FIRST_INSTANCE[level].format(",".join("?" * len(uids)))
    plan = "\n".join(row[3] for row in registry.query("EXPLAIN QUERY PLAN " + sql, uids))
    assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
