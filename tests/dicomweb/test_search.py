"""QIDO-RS over the bundled fixtures; expectations are computed from the files themselves."""

from __future__ import annotations

import pytest


def uids(response, tag: str = "0020000D") -> set[str]:
    assert response.status_code == 200, response.text
    return {item[tag]["Value"][0] for item in response.json()}


def studies_where(datasets, predicate) -> set[str]:
    return {str(d.StudyInstanceUID) for d in datasets.values() if predicate(d)}


def test_all_studies_are_listed_once(client, datasets):
    assert uids(client.get("/dicom-web/studies")) == studies_where(datasets, lambda d: True)


def test_study_results_carry_the_default_attributes_and_counts(client, datasets):
    ds = next(iter(datasets.values()))
    (study,) = client.get(f"/dicom-web/studies?StudyInstanceUID={ds.StudyInstanceUID}").json()
    members = [d for d in datasets.values() if d.StudyInstanceUID == ds.StudyInstanceUID]
    assert study["00201208"]["Value"] == [len(members)]  # NumberOfStudyRelatedInstances
    assert study["00201206"]["Value"] == [len({d.SeriesInstanceUID for d in members})]
    assert study["00080061"]["Value"] == sorted({d.Modality for d in members})  # ModalitiesInStudy
    assert study["00081190"]["Value"] == [f"http://gateway.test/dicom-web/studies/{ds.StudyInstanceUID}"]
    for tag in (
        "00080020",
        "00080030",
        "00080050",
        "00080090",
        "00100010",
        "00100020",
        "00100030",
        "00100040",
        "00200010",
    ):
        assert tag in study, tag


@pytest.mark.parametrize(
    "query,predicate",
    [
        ("PatientID=GW-0002", lambda d: d.PatientID == "GW-0002"),
        ("00100020=GW-0002", lambda d: d.PatientID == "GW-0002"),
        ("PatientName=müller^hélène", lambda d: str(d.PatientName) == "Müller^Hélène"),
        ("PatientName=MULLER*", lambda d: str(d.PatientName).startswith("Müller")),
        ("PatientName=Dup?nt*", lambda d: str(d.PatientName).startswith("Dupont")),
        ("fuzzymatching=true&PatientName=franc", lambda d: "Françoise" in str(d.PatientName)),
        ("fuzzymatching=true&PatientName=tar yam", lambda d: "Yamada" in str(d.PatientName)),
        ("StudyDate=20240101-", lambda d: d.StudyDate >= "20240101"),
        ("StudyDate=-20231231", lambda d: d.StudyDate <= "20231231"),
        ("StudyDate=20231101-20231130", lambda d: "20231101" <= d.StudyDate <= "20231130"),
        ("StudyDate=20240115", lambda d: d.StudyDate == "20240115"),
        ("StudyTime=08-09", lambda d: "080000" <= d.StudyTime <= "095959"),
        ("ModalitiesInStudy=MR", lambda d: True),  # filtered below: studies holding an MR series
        ("AccessionNumber=B200*", lambda d: d.AccessionNumber.startswith("B200")),
        # ß case-folds to "ss": a user typing without the German letter still finds Weiß.
        ("ReferringPhysicianName=weiss*", lambda d: str(d.ReferringPhysicianName).startswith("Weiß")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_study_matching(client, datasets, query, predicate):
    if query.startswith("ModalitiesInStudy"):
        expected = {str(d.StudyInstanceUID) for d in datasets.values() if d.Modality == "MR"}
    else:
        expected = studies_where(datasets, predicate)
    assert expected, "a query that matches nothing proves little"
    assert uids(client.get(f"/dicom-web/studies?{query}")) == expected


def test_uid_list_matching(client, datasets):
    wanted = sorted(studies_where(datasets, lambda d: True))[:2]
    response = client.get(f"/dicom-web/studies?StudyInstanceUID={','.join(wanted)}")
    assert uids(response) == set(wanted)


def test_exact_person_name_does_not_match_a_prefix(client):
    assert client.get("/dicom-web/studies?PatientName=Dup").json() == []


def test_series_of_a_study(client, datasets):
    ds = next(iter(datasets.values()))
    response = client.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/series")
    expected = {
        str(d.SeriesInstanceUID) for d in datasets.values() if d.StudyInstanceUID == ds.StudyInstanceUID
    }
    assert uids(response, "0020000E") == expected
    item = response.json()[0]
    assert "00201209" in item and "00080060" in item  # NumberOfSeriesRelatedInstances, Modality


def test_all_series_matching_on_modality_carry_study_attributes(client, datasets):
    response = client.get("/dicom-web/series?Modality=CT")
    expected = {str(d.SeriesInstanceUID) for d in datasets.values() if d.Modality == "CT"}
    assert uids(response, "0020000E") == expected
    assert all("00100010" in item for item in response.json())


def test_instances_of_a_series_with_their_image_attributes(client, datasets):
    ds = next(d for d in datasets.values() if "NumberOfFrames" in d)
    url = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances"
    response = client.get(url)
    item = next(i for i in response.json() if i["00080018"]["Value"][0] == ds.SOPInstanceUID)
    assert item["00280008"]["Value"] == [int(ds.NumberOfFrames)]
    assert item["00280010"]["Value"] == [ds.Rows]
    assert item["00081190"]["Value"][0].endswith(f"/instances/{ds.SOPInstanceUID}")


def test_instance_level_matching_on_instance_number(client, datasets):
    response = client.get("/dicom-web/instances?InstanceNumber=2")
    expected = {str(d.SOPInstanceUID) for d in datasets.values() if d.InstanceNumber == 2}
    assert uids(response, "00080018") == expected


def test_includefield_by_keyword_and_tag_returns_stored_attributes(client, datasets):
    ds = next(d for d in datasets.values() if "StudyDescription" in d)
    response = client.get(
        f"/dicom-web/studies?StudyInstanceUID={ds.StudyInstanceUID}"
        "&includefield=00081030,InstitutionName&includefield=00080060"
    )
    (item,) = response.json()
    assert item["00081030"]["Value"] == [ds.StudyDescription]
    assert "00080080" in item


def test_what_ohif_sends_when_opening_a_study(client, datasets):
    ds = next(iter(datasets.values()))
    query = (
        f"limit=101&offset=0&fuzzymatching=false&includefield=00081030%2C00080060"
        f"&StudyInstanceUID={ds.StudyInstanceUID}"
    )
    assert uids(client.get(f"/dicom-web/studies?{query}")) == {str(ds.StudyInstanceUID)}
    series = client.get(
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series"
        "?includefield=00080021%2C00080031%2C0008103E%2C00200011"
    )
    assert series.status_code == 200 and series.json()


def test_limit_and_offset_page_through_results(client, datasets):
    everything = [i["0020000D"]["Value"][0] for i in client.get("/dicom-web/studies").json()]
    pages = [
        client.get(f"/dicom-web/studies?limit=2&offset={o}").json() for o in range(0, len(everything), 2)
    ]
    assert [i["0020000D"]["Value"][0] for page in pages for i in page] == everything


@pytest.mark.parametrize(
    "query,words",
    [
        ("Foo=1", "Foo: unknown attribute"),
        ("ZZZZZZZZ=1", "ZZZZZZZZ"),
        ("StudyDate=2024", "not a valid DA"),
        ("StudyDate=20240101-2024", "not a DA range"),
        ("StudyInstanceUID=1.2.abc", "not a UID"),
        ("limit=-1", "limit"),
        ("offset=x", "offset"),
        ("fuzzymatching=yes", "fuzzymatching"),
        ("includefield=NotAKeyword", "NotAKeyword"),
        ("SOPInstanceUID=1.2.3", "not supported as a matching key at study level"),
        ("ReferencedStudySequence.StudyInstanceUID=1.2", "sequence attribute paths"),
        ("PatientID=1&PatientID=2", "more than once"),
        ("InstanceNumber=two", "not supported as a matching key"),
    ],
    ids=lambda v: v,
)
def test_malformed_queries_get_400_naming_the_key(client, query, words):
    response = client.get(f"/dicom-web/studies?{query}")
    assert response.status_code == 400
    assert words in response.text


def test_unknown_study_in_the_path_gets_404(client):
    response = client.get("/dicom-web/studies/1.2.3/series")
    assert response.status_code == 404
    assert "1.2.3" in response.text


def test_unknown_path_gets_404_with_a_reason(client):
    response = client.get("/dicom-web/patients")
    assert response.status_code == 404
    assert "/dicom-web/patients" in response.text
