"""Batched harvest writes (``Registry.put_instances``) end as writing one instance at a time would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.registry.record import InstanceRecord, record_from_json
from gateway.registry.store import Harvested, Registry
from tests.backends import Databases

_DUMPS = {
    "patients": "SELECT PatientID, IssuerOfPatientID, PatientName, INS FROM patients ORDER BY PatientID",
    "patient_words": "SELECT w.word, p.PatientID FROM patient_words w JOIN patients p ON p.id = w.patient "
    "ORDER BY w.word, p.PatientID",
    "studies": "SELECT st.StudyInstanceUID, st.StudyDescription, st.AccessionNumber, p.PatientID "
    "FROM studies st JOIN patients p ON p.id = st.patient ORDER BY st.StudyInstanceUID",
    "series": "SELECT SeriesInstanceUID, StudyInstanceUID, Modality, SeriesDescription FROM series "
    "ORDER BY SeriesInstanceUID",
    "instances": "SELECT SOPInstanceUID, SeriesInstanceUID, InstanceNumber, metadata FROM instances "
    "ORDER BY SOPInstanceUID",
    "locations": "SELECT source, path, size, SOPInstanceUID FROM locations ORDER BY source, path",
}


def _record(study: str, series: str, sop: str, patient: str, name: str, **extra: str) -> InstanceRecord:
    body: dict[str, Any] = {
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [series]},
        "00080018": {"vr": "UI", "Value": [sop]},
        "00100020": {"vr": "LO", "Value": [patient]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "00200013": {"vr": "IS", "Value": [int(sop.rsplit(".", 1)[1])]},
    }
    tags = {"StudyDescription": "00081030", "AccessionNumber": "00080050", "SeriesDescription": "0008103E"}
    for keyword, value in extra.items():
        body[tags[keyword]] = {"vr": "LO" if keyword != "AccessionNumber" else "SH", "Value": [value]}
    return record_from_json(body)


def _batch() -> list[Harvested]:
    """Cases a batch must get right, in order."""
    return [
        # The first instance of a study carries its description; the next one lacks it.
        Harvested(
            "a/1.dcm", 10, 1, _record("1.1", "1.1.1", "1.1.1.1", "P1", "Martin^Anne", StudyDescription="CT")
        ),
        Harvested(
            "a/2.dcm", 10, 1, _record("1.1", "1.1.1", "1.1.1.2", "P1", "Martin^Anne", AccessionNumber="A7")
        ),
        # The same patient renamed by a later instance: the name and its words are the last ones.
        Harvested("a/3.dcm", 10, 1, _record("1.2", "1.2.1", "1.2.1.1", "P1", "Bernard^Anne")),
        # A path given twice: the second holds.
        Harvested("a/4.dcm", 10, 1, _record("1.3", "1.3.1", "1.3.1.1", "P2", "Petit^Marc")),
        Harvested("a/4.dcm", 20, 2, _record("1.3", "1.3.1", "1.3.1.2", "P2", "Petit^Marc")),
        # The same instance at two paths: one record, two locations.
        Harvested("a/5.dcm", 10, 1, _record("1.3", "1.3.2", "1.3.2.1", "P2", "Petit^Marc")),
        Harvested("b/5.dcm", 10, 1, _record("1.3", "1.3.2", "1.3.2.1", "P2", "Petit^Marc")),
    ]


@pytest.fixture
def registries(tmp_path: Path, registry_urls: Databases) -> Iterator[tuple[Registry, Registry]]:
    one, other = (Registry(registry_urls.url(tmp_path / f"{name}.db")) for name in ("one", "batch"))
    yield one, other
    one.close()
    other.close()


def _dump(registry: Registry) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: [
            tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in registry.query(sql)
        ]
        for table, sql in _DUMPS.items()
    }


def _write(registry: Registry, items: list[Harvested], batched: bool) -> None:
    with registry.transaction() as conn:
        if batched:
            registry.put_instances(conn, "src", items)
        else:
            for item in items:
                registry.put_instance(
                    conn, "src", item.path, item.size, item.mtime_ns, item.record, item.pixel
                )


def test_a_batch_ends_as_instance_by_instance_writes(registries):
    one, batch = registries
    _write(one, _batch(), batched=False)
    _write(batch, _batch(), batched=True)
    assert _dump(batch) == _dump(one)
    dump = _dump(batch)
    assert ("1.1", "CT", "A7", "P1") in dump["studies"]  # merged across the study's instances
    assert ("bernard", "P1") in dump["patient_words"] and ("martin", "P1") not in dump["patient_words"]
    assert ("src", "a/4.dcm", 20, "1.3.1.2") in dump["locations"]
    assert [row[0] for row in dump["instances"]].count("1.3.2.1") == 1


def test_a_batch_replacing_held_paths_forgets_what_they_held(registries):
    one, batch = registries
    for registry, batched in ((one, False), (batch, True)):
        _write(registry, _batch(), batched)
        # a/3.dcm now holds an instance of another patient: study 1.2 and its series are gone.
        replaced = [Harvested("a/3.dcm", 30, 3, _record("1.9", "1.9.1", "1.9.1.1", "P9", "Roux^Paul"))]
        _write(registry, replaced, batched)
    assert _dump(batch) == _dump(one)
    dump = _dump(batch)
    assert "1.2" not in {row[0] for row in dump["studies"]}
    assert "1.2.1.1" not in {row[0] for row in dump["instances"]}
    assert ("roux", "P9") in dump["patient_words"]


def test_statistics_are_refreshed_after_a_bulk_write(registries):
    _, registry = registries
    _write(registry, _batch(), batched=True)
    registry.analyze()
    if registry.dialect == "sqlite":
        analyzed = {row[0] for row in registry.query("SELECT tbl FROM sqlite_stat1")}
    else:  # VACUUM (ANALYZE): the visibility map too, for index-only scans
        analyzed = {
            row[0]
            for row in registry.query(
                "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema() "
                "AND last_vacuum IS NOT NULL AND last_analyze IS NOT NULL"
            )
        }
    assert {"instances", "series", "studies", "patients"} <= analyzed


def test_statistics_are_refreshed_as_a_harvest_grows_the_registry(registries, monkeypatch):
    _, registry = registries
    refreshed: list[tuple[int, bool]] = []
    monkeypatch.setattr(
        registry, "analyze", lambda vacuum=True: refreshed.append((registry._written, vacuum))
    )
    for _ in range(5):
        registry.wrote(2000)  # 2,000 ... 10,000: due at 5,000 (the first), then at twice that
    assert refreshed == [(6000, False)]
    registry.wrote(2000)
    assert refreshed == [(6000, False), (12000, False)]
