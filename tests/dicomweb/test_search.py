"""QIDO-RS over the bundled fixtures; expectations are computed from the files themselves."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from pydicom.datadict import tag_for_keyword

from gateway.app import create_app
from gateway.codec.attributes import COMPUTED, LEVEL_COLUMNS, MATCHING, vr_of
from gateway.config import AuthConfig, Config, ServerConfig
from gateway.dicomweb.query import parse_qido
from gateway.registry.qido import compile_query
from gateway.registry.record import record_from_json
from gateway.registry.store import Harvested, Registry
from gateway.service import Gateway
from tests.backends import Databases
from tests.conftest import Client


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


# -- every attribute the index holds is returned ---------------------------------------------------
# Over a registry of two studies (one instance each) that carry every indexed attribute with
# values that differ between them. PS3.18 10.6.3.3: an attribute named by includefield, and a
# matching key, are returned; none may vanish (ContentDate and ContentTime once did).

HELD = tuple(LEVEL_COLUMNS["study"] + LEVEL_COLUMNS["series"] + LEVEL_COLUMNS["instance"])
LEVEL_OF = {k: level for level, keys in LEVEL_COLUMNS.items() for k in keys}
LEVEL_OF.update({k: level for level, keys in COMPUTED.items() for k in keys})
ABOVE = {"study": {"study"}, "series": {"study", "series"}, "instance": {"study", "series", "instance"}}
RESOURCE = {"study": "studies", "series": "series", "instance": "instances"}
UID_KEY = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}


def _value(keyword: str, n: int) -> Any:
    """Instance ``n``'s value of ``keyword``, in DICOM JSON (different for n = 1 and n = 2)."""
    vr = vr_of(keyword)
    special = {
        "PatientSex": "FM"[n - 1],
        "Modality": ("CT", "MR")[n - 1],
        "TimezoneOffsetFromUTC": ("+0100", "-0500")[n - 1],
        "PatientName": {"Alphabetic": ("Lefèvre^Élise", "Martin^Paul")[n - 1]},
        "ReferringPhysicianName": {"Alphabetic": ("Weiß^Anna", "Roux^Jean")[n - 1]},
    }
    if keyword in special:
        return special[keyword]
    if vr == "UI":
        return f"1.2.826.0.1.3680043.2.1125.{9 + n}.{len(keyword)}.{tag_for_keyword(keyword)}"
    if vr == "DA":
        return f"2021031{n}"
    if vr == "TM":
        return f"10{n}5{n}0"
    if vr in ("IS", "US"):
        return 10 * n + len(keyword)
    return f"{keyword[:8].upper()}-{n}"


def _every_keyword_body(n: int) -> dict[str, Any]:
    body = {_tag(k): {"vr": vr_of(k), "Value": [_value(k, n)]} for k in HELD}
    body["00081030"]["Value"] = [f"SCANNER [{n}] 100%_x"]  # GLOB and LIKE special characters
    return body


def _tag(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


class Every(NamedTuple):
    client: Client
    registry: Registry

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.client.get(url, **kwargs)


@pytest.fixture(scope="module")
def every(tmp_path_factory: pytest.TempPathFactory, registry_urls: Databases) -> Iterator[Every]:
    url = registry_urls.url(tmp_path_factory.mktemp("every") / "registry.db")
    gateway = Gateway(Config(ServerConfig(), url, (), auth=AuthConfig(open=True)))
    with gateway.registry.transaction() as conn:
        items = [Harvested(f"{n}.dcm", 1, 1, record_from_json(_every_keyword_body(n))) for n in (1, 2)]
        gateway.registry.put_instances(conn, "src", items)
    yield Every(Client(create_app(gateway)), gateway.registry)
    gateway.registry.close()


def _expected(keyword: str, level: str) -> dict[str, Any] | None:
    """Instance 1's element as a result at ``level`` carries it; None: present, value not asserted
    (a count of a lower level, which no stored DICOM JSON holds)."""
    if keyword in COMPUTED[LEVEL_OF[keyword]]:
        if LEVEL_OF[keyword] not in ABOVE[level]:
            return None
        if keyword == "ModalitiesInStudy":
            return {"vr": "CS", "Value": [_value("Modality", 1)]}
        return {"vr": "IS", "Value": [1]}
    return _every_keyword_body(1)[_tag(keyword)]


def _only(response, level: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    items = response.json()
    assert [i[_tag(UID_KEY[level])]["Value"] for i in items] == [[_value(UID_KEY[level], 1)]]
    return items[0]


@pytest.mark.parametrize(
    "level,keyword",
    [(level, k) for level in RESOURCE for k in HELD + tuple(k for c in COMPUTED.values() for k in c)],
    ids=lambda v: v,
)
def test_every_attribute_the_index_holds_is_returned_by_includefield(every, level, keyword):
    uid = _value(UID_KEY[level], 1)
    for name in (keyword, _tag(keyword)):
        response = every.get(
            f"/dicom-web/{RESOURCE[level]}", params={UID_KEY[level]: uid, "includefield": name}
        )
        item = _only(response, level)
        assert _tag(keyword) in item, f"{keyword} asked for and not returned"
        expected = _expected(keyword, level)
        if expected is not None:
            assert item[_tag(keyword)] == expected


@pytest.mark.parametrize(
    "level,keyword", [(level, k) for level in RESOURCE for k in MATCHING[level]], ids=lambda v: v
)
def test_every_matching_key_is_returned_with_what_it_matched(every, level, keyword):
    if keyword == "ModalitiesInStudy":
        value = _value("Modality", 1)
    else:
        element = _every_keyword_body(1)[_tag(keyword)]["Value"][0]
        value = element["Alphabetic"] if isinstance(element, dict) else str(element)
    item = _only(every.get(f"/dicom-web/{RESOURCE[level]}", params={keyword: value}), level)
    assert item.get(_tag(keyword)) == _expected(keyword, level), f"{keyword} matched and not returned"


@pytest.mark.parametrize("level", list(RESOURCE))
def test_includefield_all_returns_every_attribute_of_the_level_and_above(every, level):
    uid = _value(UID_KEY[level], 1)
    item = _only(
        every.get(f"/dicom-web/{RESOURCE[level]}", params={UID_KEY[level]: uid, "includefield": "all"}), level
    )
    for keyword, home in LEVEL_OF.items():
        if home in ABOVE[level]:
            assert item.get(_tag(keyword)) == _expected(keyword, level), keyword


@pytest.mark.parametrize("level", list(RESOURCE))
def test_a_query_selects_every_attribute_of_its_level_and_above_as_a_column(every, level):
    # What is not selected is read from the stored JSON, a statement more per page: the index's
    # own attributes must never need it.
    sql, params, _ = compile_query(parse_qido([], level), every.registry.dialect)
    keys = set(every.registry.query(sql, params)[0].keys())
    assert {k for k, home in LEVEL_OF.items() if home in ABOVE[level]} <= keys


@pytest.mark.parametrize(
    "pattern", ["SCANNER [1]*", "*[1] 100%_x", "SCANNER ?1]*", "*1] 100%_*", "*1]*"], ids=lambda v: v
)
def test_wildcards_take_sql_pattern_characters_literally(every, pattern):
    # Only * and ? are wildcards (PS3.4 C.2.2.2.4): GLOB's [ ] and LIKE's % _ are plain text.
    response = every.get("/dicom-web/studies", params={"StudyDescription": pattern})
    item = _only(response, "study")
    assert item["00081030"]["Value"] == ["SCANNER [1] 100%_x"]


@pytest.mark.parametrize("level", list(RESOURCE))
def test_a_lone_star_matches_what_lacks_the_attribute_too(every, level):
    # PS3.4 C.2.2.2.4: "*" matches any value, zero-length included (universal matching). Study 2
    # has no TimezoneOffsetFromUTC at all; SQL's pattern match would have left it out.
    body = _every_keyword_body(2)
    del body[_tag("TimezoneOffsetFromUTC")]
    _rewrite(every.registry, body)
    try:
        response = every.get(f"/dicom-web/{RESOURCE[level]}", params={"TimezoneOffsetFromUTC": "*"})
        assert response.status_code == 200
        assert len(response.json()) == 2
    finally:
        _rewrite(every.registry, _every_keyword_body(2))


def _rewrite(registry: Registry, body: dict[str, Any]) -> None:
    with registry.transaction() as conn:
        registry.put_instances(conn, "src", [Harvested("2.dcm", 1, 1, record_from_json(body))])
