"""Harvest: incremental, tolerant of bad files, and careful with deletions."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.errors import SourceError
from gateway.registry.harvest import harvest
from gateway.registry.store import Registry
from gateway.stream.folder import FolderSource
from tests.backends import Databases
from tests.conftest import fixture_files


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    root.mkdir()
    for path in fixture_files()[:6]:
        shutil.copy(path, root / path.name)
    return root


@pytest.fixture
def registry(tmp_path: Path, registry_urls: Databases) -> Iterator[Registry]:
    registry = Registry(registry_urls.url(tmp_path / "registry.db"))
    yield registry
    registry.close()


def test_first_harvest_indexes_every_file(folder, registry):
    stats = harvest(registry, FolderSource("a", folder))
    assert (stats.seen, stats.indexed, stats.failed) == (6, 6, 0)
    assert registry.counts()["instances"] == 6


def test_unchanged_files_are_skipped(folder, registry):
    harvest(registry, FolderSource("a", folder))
    stats = harvest(registry, FolderSource("a", folder))
    assert (stats.indexed, stats.skipped) == (0, 6)


def test_changed_file_is_read_again(folder, registry):
    harvest(registry, FolderSource("a", folder))
    path = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(path)
    ds.StudyDescription = "Changed description"
    ds.save_as(path)
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock
    stats = harvest(registry, FolderSource("a", folder))
    assert stats.indexed == 1
    (row,) = registry.query(
        "SELECT StudyDescription FROM studies WHERE StudyInstanceUID=?", (str(ds.StudyInstanceUID),)
    )
    assert row[0] == "Changed description"


def test_deleted_files_leave_the_index_and_empty_studies_go(folder, registry):
    harvest(registry, FolderSource("a", folder))
    for path in folder.iterdir():
        path.unlink()
    stats = harvest(registry, FolderSource("a", folder))
    assert stats.removed == 6
    assert registry.counts() == {
        "patients": 0,
        "studies": 0,
        "series": 0,
        "instances": 0,
        "locations": 0,
        "rejects": 0,
    }


def test_unreadable_files_are_counted_remembered_and_not_fatal(folder, registry):
    (folder / "notes.txt").write_text("not DICOM")
    good = sorted(folder.iterdir())[0].read_bytes()
    (folder / "truncated.dcm").write_bytes(good[:300])
    stats = harvest(registry, FolderSource("a", folder))
    assert (stats.indexed, stats.failed) == (6, 2)
    reasons = {row["path"]: row["reason"] for row in registry.query("SELECT path, reason FROM rejects")}
    assert "not a DICOM file" in reasons["notes.txt"]
    again = harvest(registry, FolderSource("a", folder))
    assert (again.failed, again.skipped) == (0, 8)  # not re-read until they change


def test_a_missing_folder_stops_harvest_without_removing_anything(folder, registry, tmp_path):
    harvest(registry, FolderSource("a", folder))
    with pytest.raises(SourceError, match="does not exist"):
        harvest(registry, FolderSource("a", tmp_path / "unmounted"))
    assert registry.counts()["instances"] == 6


def _hostile(path: Path, depth: int) -> None:
    ds = pydicom.dcmread(fixture_files()[0])
    item = Dataset()
    item.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([item])
        item = outer
    ds.ContentSequence = item.ContentSequence
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.save_as(path)


def test_deeply_nested_sequences_are_refused_cleanly(folder, registry):
    _hostile(folder / "deep.dcm", 200)
    stats = harvest(registry, FolderSource("a", folder))
    assert stats.failed == 1
    (row,) = registry.query("SELECT reason FROM rejects WHERE path='deep.dcm'")
    assert "nested" in row[0]


def test_the_same_instance_in_two_sources_is_one_record_with_two_locations(folder, registry, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    harvest(registry, FolderSource("a", folder))
    harvest(registry, FolderSource("b", copy))
    counts = registry.counts()
    assert (counts["instances"], counts["locations"]) == (6, 12)
    for path in copy.iterdir():
        path.unlink()
    harvest(registry, FolderSource("b", copy))
    assert registry.counts()["instances"] == 6  # still held by source a


def test_cached_locations_follow_a_harvest_that_moved_the_file(folder, registry, monkeypatch):
    import gateway.registry.store as store

    monkeypatch.setattr(store, "_CACHE_CHECK", 0.0)  # check on every lookup for this test
    harvest(registry, FolderSource("a", folder))
    path = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    assert [location.path for location in registry.instance_location(*uids)] == [path.name]
    path.rename(folder / "moved.dcm")
    harvest(registry, FolderSource("a", folder))
    assert [location.path for location in registry.instance_location(*uids)] == ["moved.dcm"]


def _fuzzy(registry: Registry, word: str) -> set[str]:
    from gateway.dicomweb.query import parse_qido
    from gateway.registry.qido import compile_query

    query = parse_qido([("PatientName", word), ("fuzzymatching", "true")], "study")
    sql, params, _ = compile_query(query, registry.dialect)
    return {row["StudyInstanceUID"] for row in registry.query(sql, params)}


def test_a_renamed_patient_is_found_by_the_new_name_words_only(tmp_path, registry):
    from fixtures.generate import make_ct_study

    folder = tmp_path / "renamed"
    (path,) = make_ct_study(folder, n_instances=1, rows=8, cols=8, seed=11)
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID = "Quenouille^Albertine", "RENAMED-1"
    ds.save_as(path)
    harvest(registry, FolderSource("a", folder))
    assert str(ds.StudyInstanceUID) in _fuzzy(registry, "quen")
    ds.PatientName = "Vasseur^Albertine"
    ds.save_as(path)
    os.utime(path, ns=(1, 1))
    harvest(registry, FolderSource("a", folder))
    assert _fuzzy(registry, "quen") == set()
    assert str(ds.StudyInstanceUID) in _fuzzy(registry, "vass")
    path.unlink()
    harvest(registry, FolderSource("a", folder))
    assert registry.query("SELECT COUNT(*) FROM patient_words WHERE word = 'vasseur'")[0][0] == 0


def _study_counts(registry: Registry, study: str) -> tuple[list[str], int, int, dict[str, int]]:
    """ModalitiesInStudy, NumberOfStudyRelatedSeries / Instances, and each series' instances."""
    from gateway.dicomweb.query import parse_qido
    from gateway.registry.qido import compile_query

    sql, params, _ = compile_query(parse_qido([("StudyInstanceUID", study)], "study"), registry.dialect)
    (row,) = registry.query(sql, params)
    sql, params, _ = compile_query(parse_qido([], "series", {"StudyInstanceUID": study}), registry.dialect)
    series = {
        r["SeriesInstanceUID"]: r["NumberOfSeriesRelatedInstances"] for r in registry.query(sql, params)
    }
    modalities = sorted(set((row["ModalitiesInStudy"] or "").split(",")) - {""})
    return modalities, row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"], series


def test_study_and_series_counts_follow_added_and_removed_files(tmp_path, registry):
    from fixtures.generate import make_ct_study

    folder = tmp_path / "counted"
    ct = make_ct_study(folder / "ct", n_instances=3, rows=8, cols=8, seed=1, study_uid="1.2.3.77")
    (mr,) = make_ct_study(folder / "mr", n_instances=1, rows=8, cols=8, seed=2, study_uid="1.2.3.77")
    ds = pydicom.dcmread(mr)
    ds.Modality, ds.PatientID = "MR", pydicom.dcmread(ct[0]).PatientID
    ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3.77.2", "1.2.3.77.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(mr)
    ct_series, mr_series = (str(pydicom.dcmread(p).SeriesInstanceUID) for p in (ct[0], mr))
    harvest(registry, FolderSource("a", folder))
    assert _study_counts(registry, "1.2.3.77") == (["CT", "MR"], 2, 4, {ct_series: 3, mr_series: 1})
    ct[0].unlink()
    harvest(registry, FolderSource("a", folder))
    assert _study_counts(registry, "1.2.3.77") == (["CT", "MR"], 2, 3, {ct_series: 2, mr_series: 1})
    mr.unlink()
    harvest(registry, FolderSource("a", folder))
    assert _study_counts(registry, "1.2.3.77") == (["CT"], 1, 2, {ct_series: 2})
    ds.save_as(mr)  # back, in a later harvest
    harvest(registry, FolderSource("a", folder))
    assert _study_counts(registry, "1.2.3.77") == (["CT", "MR"], 2, 3, {ct_series: 2, mr_series: 1})
