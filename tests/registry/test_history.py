"""A patient's imaging history across sources, joined by INS, restricted as QIDO restricts: on
both registry backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.registry.history import patient_history, study_history
from gateway.registry.record import InstanceRecord, build_record
from gateway.registry.store import Registry
from gateway.registry.writes import Harvested
from gateway.types import Restriction
from tests.backends import Databases

NIR_OID = "1.2.250.1.213.1.4.8"
ALICE, BOB = "1800175123456", "2900275654321"
S1, S2, S3, S4, S5, S6 = (f"1.2.826.0.1.77.{n}" for n in range(1, 7))


def instance(
    study: str,
    series: str,
    number: int,
    *,
    patient_id: str,
    ins: str | None = None,
    date: str = "20240601",
    time: str = "100000",
    modality: str = "CT",
    series_number: int = 1,
    body_part: str | None = None,
    study_description: str | None = None,
    series_description: str | None = None,
    accession: str | None = None,
    anatomy: tuple[str, str] | None = None,
) -> InstanceRecord:
    """One instance's record, as harvest would make it from a file with these attributes."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = f"{series}.{number}"
    ds.InstanceNumber, ds.SeriesNumber = number, series_number
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = patient_id, "SITE", "DOE^JANE"
    ds.StudyDate, ds.StudyTime, ds.Modality = date, time, modality
    if ins:
        item = Dataset()
        item.PatientID, item.IssuerOfPatientID = ins, NIR_OID
        ds.OtherPatientIDsSequence = Sequence([item])
    for keyword, value in (
        ("BodyPartExamined", body_part),
        ("StudyDescription", study_description),
        ("SeriesDescription", series_description),
        ("AccessionNumber", accession),
    ):
        if value is not None:
            setattr(ds, keyword, value)
    if anatomy:
        code = Dataset()
        code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning = anatomy[0], anatomy[1], "region"
        ds.AnatomicRegionSequence = Sequence([code])
    return build_record(ds, None)


def put(registry: Registry, source: str, records: list[InstanceRecord]) -> None:
    with registry.transaction() as conn:
        registry.put_instances(conn, source, [Harvested(f"{r.uids[2]}.dcm", 1, 1, r) for r in records])


def alice_and_others(registry: Registry) -> None:
    """Alice at two sites (local IDs A-1 and LOCAL-42, one INS), Bob, and a patient without INS."""
    chest = dict(patient_id="A-1", ins=ALICE, accession="ACC1", study_description="CT THORAX")
    axial = dict(body_part="CHEST", series_description="Axial", **chest)
    put(registry, "a", [
        *(instance(S1, S1 + ".1", n, **axial) for n in (1, 2, 3)),
        instance(S1, S1 + ".2", 1, modality="SR", series_number=2, **chest),
        instance(S3, S3 + ".1", 1, patient_id="A-1", ins=ALICE, date="20200101", modality="CR"),
        instance(S4, S4 + ".1", 1, patient_id="B-1", ins=BOB, date="20240301"),
        instance(S5, S5 + ".1", 1, patient_id="N-1", date="20240101"),
        instance(S6, S6 + ".1", 1, patient_id="N-1", date="20220101"),
    ])  # fmt: skip
    put(registry, "b", [
        instance(S2, S2 + ".1", 1, patient_id="LOCAL-42", ins=ALICE, date="20230105", modality="MR",
                 body_part="BRAIN", study_description="IRM CEREBRALE", anatomy=("SCT", "12738006")),
        instance(S3, S3 + ".1", 1, patient_id="A-1", ins=ALICE, date="20200101", modality="CR"),
    ])  # fmt: skip


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, registry_urls: Databases) -> Iterator[Registry]:
    found = Registry(registry_urls.url(tmp_path_factory.mktemp("history") / "registry.db"))
    alice_and_others(found)
    yield found
    found.close()


def uids(history) -> list[str]:
    return [study.StudyInstanceUID for study in history.studies]


def test_a_patients_history_joins_their_sites_by_ins_newest_first(registry):
    history = patient_history(registry, ALICE, None)
    assert uids(history) == [S1, S2, S3] and history.total == 3
    first = history.studies[0]
    assert (first.StudyDate, first.StudyTime, first.AccessionNumber) == ("20240601", "100000", "ACC1")
    assert first.StudyDescription == "CT THORAX" and first.INS == ALICE
    assert first.modalities == ("CT", "SR") and first.body_parts == ("CHEST",)
    assert first.instances == 4 and first.sources == ("a",)
    axial, report = first.series
    assert (axial.SeriesInstanceUID, axial.SeriesNumber, axial.Modality) == (S1 + ".1", 1, "CT")
    assert axial.instances == 3
    assert (axial.SeriesDescription, axial.BodyPartExamined) == ("Axial", "CHEST")
    assert (report.Modality, report.instances) == ("SR", 1)
    assert history.studies[1].PatientID == "LOCAL-42"  # the other site's local ID, the same person
    assert history.studies[2].sources == ("a", "b")  # held by both


@pytest.mark.parametrize(
    ("restriction", "expected"),
    [
        (Restriction(patients=frozenset({BOB})), []),
        (Restriction(patients=frozenset()), []),
        (Restriction(patients=frozenset({ALICE}), hidden=frozenset({S2})), [S1, S3]),
        (Restriction(studies=frozenset({S1})), [S1]),
        (Restriction(patients=frozenset({ALICE, BOB})), [S1, S2, S3]),
    ],
    ids=["another patient", "nobody", "a hidden study", "a link's study", "granted"],
)
def test_the_restriction_leaves_out_what_the_caller_may_not_see(registry, restriction, expected):
    history = patient_history(registry, ALICE, restriction)
    assert uids(history) == expected and history.total == len(expected)


@pytest.mark.parametrize(
    ("dates", "modalities", "expected"),
    [
        (("20230101", ""), (), [S1, S2]),
        (("", "20231231"), (), [S2, S3]),
        (("20230105", "20230105"), (), [S2]),
        (("", ""), ("MR",), [S2]),
        (("", ""), ("CR", "MR"), [S2, S3]),
        (("", ""), ("SR",), [S1]),  # any series' modality
        (("20240101", ""), ("MR",), []),
    ],
)
def test_dates_and_modalities_narrow_the_history(registry, dates, modalities, expected):
    assert uids(patient_history(registry, ALICE, None, dates=dates, modalities=modalities)) == expected


def test_a_page_carries_the_total(registry):
    history = patient_history(registry, ALICE, None, limit=1, offset=1)
    assert uids(history) == [S2] and history.total == 3
    assert uids(patient_history(registry, ALICE, None, limit=2, offset=3)) == []


def test_a_studys_history_is_its_patients_other_studies_by_ins_else_local_patient(registry):
    current, others = study_history(registry, S1, None)
    assert current is not None and current.StudyInstanceUID == S1
    assert uids(others) == [S2, S3]
    current, others = study_history(registry, S5, None)  # no INS: that site's patient N-1
    assert uids(others) == [S6]
    assert study_history(registry, "1.2.3.999", None)[0] is None


def test_a_studys_history_is_restricted_but_not_the_study_itself(registry):
    restriction = Restriction(patients=frozenset({ALICE}), hidden=frozenset({S3}))
    current, others = study_history(registry, S1, restriction)
    assert current is not None and uids(others) == [S2]


def test_anatomic_region_codes_are_read_from_the_stored_json_when_asked(registry):
    _, others = study_history(registry, S1, None, anatomy=True)
    brain = others.studies[0].series[0]
    assert brain.anatomy == (("SCT", "12738006"),)
    assert patient_history(registry, ALICE, None).studies[1].series[0].anatomy == ()
