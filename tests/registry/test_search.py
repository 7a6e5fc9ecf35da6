"""What the layers above ask of the index by name, not by SQL: a search's page (``search``), whether
a path's study or series is indexed (``holds``), each result's first instance (``first_instances``),
and a retrieval's instances by the UIDs of its path (``instance_files``, ``metadata``,
``locations``), on both backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.synthetic import generate
from gateway.dicomweb.query import parse_qido
from gateway.registry.qido import MAX_RESULTS
from gateway.registry.store import Registry
from tests.backends import Databases


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, registry_urls: Databases) -> Iterator[Registry]:
    registry = Registry(registry_urls.url(tmp_path_factory.mktemp("search") / "registry.db"))
    generate(registry, 1500, seed=3)
    yield registry
    registry.close()


@pytest.fixture(scope="module")
def study(registry: Registry) -> tuple[str, str, str]:
    """A study of several series, one of its series and that series' first instance."""
    ((uid,),) = registry.query(
        "SELECT StudyInstanceUID FROM series GROUP BY StudyInstanceUID HAVING COUNT(*) > 1 "
        "ORDER BY StudyInstanceUID LIMIT 1"
    )
    files = registry.instance_files({"StudyInstanceUID": uid})
    series = registry.query(
        "SELECT SeriesInstanceUID FROM instances WHERE SOPInstanceUID = ?", (files[-1][0].SOPInstanceUID,)
    )[0][0]
    first = registry.instance_files({"StudyInstanceUID": uid, "SeriesInstanceUID": series})[0][0]
    return uid, series, first.SOPInstanceUID


def _scopes(study: tuple[str, str, str]) -> list[dict[str, str]]:
    uid, series, instance = study
    return [
        {"StudyInstanceUID": uid},
        {"StudyInstanceUID": uid, "SeriesInstanceUID": series},
        {"StudyInstanceUID": uid, "SeriesInstanceUID": series, "SOPInstanceUID": instance},
    ]


@pytest.mark.parametrize("depth", [0, 1, 2], ids=["study", "series", "instance"])
def test_a_retrieval_names_its_instances_by_the_uids_of_its_path(registry, study, depth):
    scope = _scopes(study)[depth]
    files = registry.instance_files(scope)
    locations = registry.locations(scope)
    assert files and len(registry.metadata(scope)) == len(files) == len(locations)
    for (file, *_), (location, *_) in zip(files, locations, strict=True):
        assert file.SOPInstanceUID == location.SOPInstanceUID
        assert location.StudyInstanceUID == scope["StudyInstanceUID"]
        assert location.SeriesInstanceUID == scope.get("SeriesInstanceUID", location.SeriesInstanceUID)
        assert location.SOPInstanceUID == scope.get("SOPInstanceUID", location.SOPInstanceUID)
    assert (len(files) == 1) == (depth == 2)


def test_a_scope_without_a_study_or_with_another_key_is_refused(registry, study):
    with pytest.raises(ValueError, match="a scope names a study"):
        registry.instance_files({"SeriesInstanceUID": study[1]})
    with pytest.raises(ValueError, match="a scope names a study"):
        registry.metadata({"StudyInstanceUID": study[0], "PatientID": "1"})


def test_holds_tells_an_indexed_study_and_series_of_it(registry, study):
    uid, series, _ = study
    assert registry.holds({}) and registry.holds({"StudyInstanceUID": uid})
    assert registry.holds({"StudyInstanceUID": uid, "SeriesInstanceUID": series})
    assert not registry.holds({"StudyInstanceUID": "1.2.3"})
    assert not registry.holds({"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": series})


def test_the_first_instance_of_each_result_is_the_first_a_retrieval_sends(registry, study):
    uid, series, instance = study
    stored = registry.metadata({"StudyInstanceUID": uid})
    assert registry.first_instances("study", [uid, uid, "1.2.3"]) == {uid: stored[0]}
    first_of_series = registry.metadata({"StudyInstanceUID": uid, "SeriesInstanceUID": series})[0]
    assert registry.first_instances("series", [series]) == {series: first_of_series}
    assert registry.first_instances("instance", [instance]) == {instance: first_of_series}


def test_a_search_answers_its_page_and_whether_more_matched(registry):
    (total,) = registry.query("SELECT COUNT(*) FROM studies")[0]
    rows, more = registry.search(parse_qido([("limit", "5")], "study"))
    assert len(rows) == 5 and more
    rows, more = registry.search(parse_qido([("offset", str(total - 2))], "study"))
    assert len(rows) == 2 and not more
    rows, more = registry.search(parse_qido([], "instance"))
    assert len(rows) == MAX_RESULTS and more  # the server's own page
