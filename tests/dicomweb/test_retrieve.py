"""WADO-RS over the bundled fixtures: every frame and instance equals what pydicom reads."""

from __future__ import annotations

import io

import orjson
import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.conftest import fixture_files
from tests.helpers import ANY_FRAME, ANY_INSTANCE, expected_frames, instance_url, parts

FILES = fixture_files()


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_frame_equals_pydicoms_frame(client, path):
    ds = pydicom.dcmread(path)
    frames = expected_frames(ds)
    numbers = ",".join(str(n) for n in range(1, len(frames) + 1))
    response = client.get(instance_url(ds) + f"/frames/{numbers}", headers={"Accept": ANY_FRAME})
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    got = parts(response)
    assert [payload for _, payload in got] == frames
    syntax = ds.file_meta.TransferSyntaxUID
    served = syntax if syntax.is_encapsulated else ExplicitVRLittleEndian
    assert {headers["transfer-syntax"] for headers, _ in got} == {served}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_instance_retrieve_is_the_file_or_its_explicit_little_endian_form(client, path):
    ds = pydicom.dcmread(path)
    response = client.get(instance_url(ds), headers={"Accept": ANY_INSTANCE})
    assert response.status_code == 200, response.text
    ((headers, payload),) = parts(response)
    if ds.file_meta.TransferSyntaxUID in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        served = pydicom.dcmread(io.BytesIO(payload))
        assert served.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert served.SOPInstanceUID == ds.SOPInstanceUID
        assert (served.pixel_array == ds.pixel_array).all()
    else:
        assert payload == path.read_bytes()


def test_compressed_frames_come_in_their_own_media_type_by_default(client, datasets):
    ds = next(d for d in datasets.values() if d.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50")
    response = client.get(
        instance_url(ds) + "/frames/1",
        headers={"Accept": 'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50'},
    )
    assert response.status_code == 200
    ((headers, payload),) = parts(response)
    assert headers["content-type"].startswith("image/jpeg")
    assert payload[:2] == b"\xff\xd8"


def test_compressed_frames_without_transfer_syntax_star_are_not_acceptable(client, datasets):
    ds = next(d for d in datasets.values() if d.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90")
    response = client.get(
        instance_url(ds) + "/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
    )
    assert response.status_code == 406
    assert "transcoding" in response.text and "image/jp2" in response.text


def test_study_retrieve_holds_every_instance_of_the_study(client, datasets):
    ds = next(d for d in datasets.values() if d.file_meta.TransferSyntaxUID.is_encapsulated)
    study = [d for d in datasets.values() if d.StudyInstanceUID == ds.StudyInstanceUID]
    response = client.get(f"/dicom-web/studies/{ds.StudyInstanceUID}", headers={"Accept": ANY_INSTANCE})
    assert response.status_code == 200
    served = {str(pydicom.dcmread(io.BytesIO(payload)).SOPInstanceUID) for _, payload in parts(response)}
    assert served == {str(d.SOPInstanceUID) for d in study}


def test_study_retrieve_is_refused_whole_when_one_instance_cannot_be_sent(client, datasets):
    ds = next(d for d in datasets.values() if d.file_meta.TransferSyntaxUID.is_encapsulated)
    response = client.get(
        f"/dicom-web/studies/{ds.StudyInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    assert response.status_code == 406


@pytest.mark.parametrize(
    "suffix,status,words",
    [
        ("/frames/0", 400, "frame"),
        ("/frames/1,x", 400, "'x'"),
        ("/frames/99", 404, "99"),
        ("/bulk/00091234", 404, "no bulk data"),
    ],
    ids=["frame-zero", "frame-not-a-number", "frame-past-the-end", "bulk-absent"],
)
def test_bad_frame_and_bulk_requests_are_refused_with_a_reason(client, datasets, suffix, status, words):
    ds = next(iter(datasets.values()))
    response = client.get(instance_url(ds) + suffix, headers={"Accept": ANY_FRAME})
    assert response.status_code == status
    assert words in response.text


@pytest.mark.parametrize(
    "url,words",
    [
        ("/dicom-web/studies/1.2.3", "study 1.2.3"),
        ("/dicom-web/studies/1.2.3/metadata", "study 1.2.3"),
        ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1", "study 1.2.3"),  # the first unknown
    ],
    ids=["study", "metadata", "frames"],
)
def test_unknown_uids_get_404_naming_them(client, url, words):
    response = client.get(url)
    assert response.status_code == 404
    assert words in response.text


def test_series_metadata_is_one_object_per_instance_with_absolute_bulk_uris(client, datasets):
    ds = next(d for d in datasets.values() if "NumberOfFrames" in d and int(d.NumberOfFrames) > 1)
    url = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"
    response = client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    uids = {d.SOPInstanceUID for d in datasets.values() if d.SeriesInstanceUID == ds.SeriesInstanceUID}
    assert {item["00080018"]["Value"][0] for item in body} == uids
    pixel_uri = next(i for i in body if i["00080018"]["Value"][0] == ds.SOPInstanceUID)["7FE00010"][
        "BulkDataURI"
    ]
    assert pixel_uri == "http://gateway.test" + instance_url(ds) + "/bulk/7FE00010"


def test_pixel_data_bulk_uri_serves_the_frames(client, datasets):
    ds = next(d for d in datasets.values() if "NumberOfFrames" in d and int(d.NumberOfFrames) > 1)
    meta = client.get(instance_url(ds) + "/metadata").json()[0]
    uri = meta["7FE00010"]["BulkDataURI"].removeprefix("http://gateway.test")
    response = client.get(uri, headers={"Accept": ANY_FRAME})
    assert response.status_code == 200
    assert [payload for _, payload in parts(response)] == expected_frames(ds)


def test_metadata_decodes_text_with_the_files_character_set(client, datasets):
    latin = next(d for d in datasets.values() if d.get("SpecificCharacterSet") == "ISO_IR 100")
    item = client.get(instance_url(latin) + "/metadata").json()[0]
    assert item["00100010"]["Value"][0]["Alphabetic"] == str(latin.PatientName)
    assert not str(latin.PatientName).isascii()
    assert item["00080005"]["Value"] == ["ISO_IR 192"]


def test_metadata_person_names_keep_ideographic_and_phonetic_groups(client, datasets):
    ds = next(d for d in datasets.values() if "=" in str(d.PatientName))
    item = client.get(instance_url(ds) + "/metadata").json()[0]
    name = item["00100010"]["Value"][0]
    assert set(name) == {"Alphabetic", "Ideographic", "Phonetic"}
    assert name["Ideographic"] == ds.PatientName.ideographic


def test_metadata_numbers_are_json_numbers(client, datasets):
    ds = next(d for d in datasets.values() if "SliceThickness" in d and "InstanceNumber" in d)
    item = client.get(instance_url(ds) + "/metadata").json()[0]
    assert item["00200013"] == {"vr": "IS", "Value": [int(ds.InstanceNumber)]}
    assert item["00180050"]["vr"] == "DS"
    assert item["00180050"]["Value"] == [float(ds.SliceThickness)]
    assert item["00280010"]["Value"] == [ds.Rows]


def test_metadata_is_refused_as_xml(client, datasets):
    ds = next(iter(datasets.values()))
    response = client.get(
        instance_url(ds) + "/metadata", headers={"Accept": 'multipart/related; type="application/dicom+xml"'}
    )
    assert response.status_code == 406


def test_study_metadata_needs_no_file_access(gateway, client, datasets, monkeypatch):
    """Metadata comes from the index: it is served even with every source unreachable."""
    ds = next(iter(datasets.values()))
    for source in gateway.sources.values():
        monkeypatch.setattr(source, "root", source.root / "unmounted")
    response = client.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata")
    assert response.status_code == 200
    assert len(orjson.loads(response.content)) == sum(
        1 for d in datasets.values() if d.StudyInstanceUID == ds.StudyInstanceUID
    )
