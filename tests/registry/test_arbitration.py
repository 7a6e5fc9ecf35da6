"""A source never rewrites another source's truth: copies of one instance that disagree are
resolved by source priority (metadata and pixels alike), whatever the harvest order; the losing
copy is listed as a conflict and never served; counts stay true when instances move."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from gateway.registry.harvest import harvest
from gateway.registry.store import Registry
from gateway.stream.folder import FolderSource
from tests.backends import Databases
from tests.conftest import fixture_files

RANKS = {"main": 0, "copy": 1}


@pytest.fixture
def registry(tmp_path: Path, registry_urls: Databases) -> Iterator[Registry]:
    registry = Registry(registry_urls.url(tmp_path / "registry.db"))
    registry.ranks = dict(RANKS)
    yield registry
    registry.close()


def write(folder: Path, name: str, **changes: str) -> pydicom.Dataset:
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(fixture_files()[0])
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(folder / name)
    return ds


def patient_of(registry: Registry, uid: str) -> str:
    rows = registry.query(
        "SELECT p.PatientID FROM instances i JOIN series se ON se.SeriesInstanceUID = i.SeriesInstanceUID "
        "JOIN studies st ON st.StudyInstanceUID = se.StudyInstanceUID JOIN patients p ON p.id = st.patient "
        "WHERE i.SOPInstanceUID = ?",
        (uid,),
    )
    return rows[0][0]


def served_from(registry: Registry, uid: str) -> set[str]:
    return {row[0] for row in registry.query("SELECT source FROM locations WHERE SOPInstanceUID=?", (uid,))}


@pytest.mark.parametrize("order", [("main", "copy"), ("copy", "main")], ids=["main first", "copy first"])
def test_a_conflicting_copy_loses_to_the_higher_priority_source_whatever_the_order(tmp_path, registry, order):
    main = write(tmp_path / "main", "a.dcm", PatientID="RIGHT")
    write(tmp_path / "copy", "a.dcm", PatientID="WRONG")
    uid = str(main.SOPInstanceUID)
    for name in order:
        harvest(registry, FolderSource(name, tmp_path / name))
    assert patient_of(registry, uid) == "RIGHT"
    assert served_from(registry, uid) == {"main"}  # the conflicting copy's pixels are never served
    (conflict,) = registry.conflicts("copy")
    assert conflict["SOPInstanceUID"] == uid and "priority" in conflict["reason"]


def test_a_harvest_reports_its_conflicts(tmp_path, registry, caplog):
    write(tmp_path / "main", "a.dcm", PatientID="RIGHT")
    write(tmp_path / "copy", "a.dcm", PatientID="WRONG")
    harvest(registry, FolderSource("main", tmp_path / "main"))
    stats = harvest(registry, FolderSource("copy", tmp_path / "copy"))
    assert stats.conflicts == 1 and stats.indexed == 0
    assert "conflicts, not served" in caplog.text


def test_an_identical_copy_is_one_more_location_and_keeps_the_higher_prioritys_metadata(tmp_path, registry):
    main = write(tmp_path / "main", "a.dcm")
    write(tmp_path / "copy", "a.dcm")
    harvest(registry, FolderSource("main", tmp_path / "main"))
    harvest(registry, FolderSource("copy", tmp_path / "copy"))
    uid = str(main.SOPInstanceUID)
    assert served_from(registry, uid) == {"main", "copy"}
    assert registry.query("SELECT held_by FROM instances WHERE SOPInstanceUID=?", (uid,))[0][0] == "main"
    assert registry.conflicts() == []


def test_a_lower_priority_copy_cannot_refile_a_study_under_another_patient(tmp_path, registry):
    main = write(tmp_path / "main", "a.dcm", PatientID="RIGHT")
    # Another instance of the same study, under another patient, from the lower-priority source.
    write(tmp_path / "copy", "b.dcm", PatientID="WRONG", SOPInstanceUID=generate_uid())
    harvest(registry, FolderSource("main", tmp_path / "main"))
    harvest(registry, FolderSource("copy", tmp_path / "copy"))
    assert patient_of(registry, str(main.SOPInstanceUID)) == "RIGHT"
    (conflict,) = registry.conflicts("copy")
    assert "belongs to another patient" in conflict["reason"]
    assert registry.counts()["instances"] == 1


def test_learning_from_a_lower_priority_source_changes_nothing(tmp_path, registry):
    from gateway.codec.dicomfile import read_header
    from gateway.registry.record import build_record

    main = write(tmp_path / "main", "a.dcm", PatientID="RIGHT")
    harvest(registry, FolderSource("main", tmp_path / "main"))
    other = write(tmp_path / "sent", "a.dcm", PatientID="WRONG")
    with open(tmp_path / "sent" / "a.dcm", "rb") as handle:
        ds, pixel = read_header(handle)
    refused = registry.learn(
        "copy", "/x", build_record(ds, pixel), str(other.file_meta.TransferSyntaxUID), {}
    )
    assert refused and patient_of(registry, str(main.SOPInstanceUID)) == "RIGHT"


def test_when_the_winner_goes_the_conflicting_copy_is_indexed_again(tmp_path, registry):
    write(tmp_path / "main", "a.dcm", PatientID="RIGHT")
    copy = write(tmp_path / "copy", "a.dcm", PatientID="OTHER")
    harvest(registry, FolderSource("main", tmp_path / "main"))
    harvest(registry, FolderSource("copy", tmp_path / "copy"))
    (tmp_path / "main" / "a.dcm").unlink()
    harvest(registry, FolderSource("main", tmp_path / "main"))
    harvest(registry, FolderSource("copy", tmp_path / "copy"))
    assert patient_of(registry, str(copy.SOPInstanceUID)) == "OTHER"
    assert registry.conflicts() == []


def counts(registry: Registry) -> dict[str, tuple[int, ...]]:
    rows = registry.query("SELECT SeriesInstanceUID, NumberOfSeriesRelatedInstances FROM series")
    studies = registry.query(
        "SELECT StudyInstanceUID, NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances FROM studies"
    )
    return {r[0]: (r[1],) for r in rows} | {r[0]: (r[1], r[2]) for r in studies}


def test_an_instance_moved_to_another_series_and_study_leaves_true_counts_and_no_empty_study(
    tmp_path, registry
):
    first = write(tmp_path / "main", "a.dcm")
    write(tmp_path / "main", "b.dcm", SOPInstanceUID=generate_uid())
    write(tmp_path / "copy", "a.dcm")  # the same instance, also held by a second source
    harvest(registry, FolderSource("main", tmp_path / "main"))
    harvest(registry, FolderSource("copy", tmp_path / "copy"))
    old_series, old_study = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
    assert counts(registry)[old_series] == (2,)
    # The main archive refiles both of its instances under a new study and series.
    new_study, new_series = generate_uid(), generate_uid()
    for name in ("a.dcm", "b.dcm"):
        ds = pydicom.dcmread(tmp_path / "main" / name)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = new_study, new_series
        ds.save_as(tmp_path / "main" / name)
    harvest(registry, FolderSource("main", tmp_path / "main"))
    found = counts(registry)
    assert found[new_series] == (2,) and found[new_study] == (1, 2)
    # The copy's instance now disagrees with the higher-priority copy: a conflict, so the old
    # series and study hold nothing and are gone.
    assert old_series not in found and old_study not in found
    assert [row["SOPInstanceUID"] for row in registry.conflicts("copy")] == [str(first.SOPInstanceUID)]


def test_when_the_copy_that_set_the_metadata_goes_the_remaining_copy_sets_it_again(tmp_path, registry):
    main = write(tmp_path / "main", "a.dcm", ContentTime="110000")
    write(tmp_path / "copy", "a.dcm", ContentTime="100000")  # the same instance, otherwise
    harvest(registry, FolderSource("copy", tmp_path / "copy"))
    harvest(registry, FolderSource("main", tmp_path / "main"))
    uid = str(main.SOPInstanceUID)
    assert (
        registry.query("SELECT ContentTime FROM instances WHERE SOPInstanceUID=?", (uid,))[0][0] == "110000"
    )
    (tmp_path / "main" / "a.dcm").unlink()
    harvest(registry, FolderSource("main", tmp_path / "main"))
    harvest(registry, FolderSource("copy", tmp_path / "copy"))  # its file unchanged: read again
    assert (
        registry.query("SELECT ContentTime FROM instances WHERE SOPInstanceUID=?", (uid,))[0][0] == "100000"
    )
