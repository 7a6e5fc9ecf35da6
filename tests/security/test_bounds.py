"""Bounded input: every number, list, string and header a request carries has a limit, and past
it the answer is a 400 naming the parameter and the limit, never a 500. On both registry backends
(the ``client`` fixture), over the bundled fixtures with open access.

The limits (README, DICOMweb conformance): limit <= 2,147,483,647 (pages of at most 1,000),
offset <= 100,000, a matching value <= 1,024 characters, a UID or CS list <= 1,000 values, a
fuzzy-matched name <= 16 words, includefield <= 256 entries, integer keys within their VR's
range; frame lists without duplicates, within the instance's frames (PS3.18 10.4.1), at most
10,000 when the count is unknown; bulk data paths of 8-hex-digit tags, at most 32 sequences deep;
Accept <= 8,192 characters, 64 media ranges, 16 parameters a range, q from 0 to 1."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.dicomweb.query import parse_qido
from gateway.registry.search import plan_query
from gateway.types import Restriction
from tests.helpers import ANY_FRAME, instance_url, parts

STUDIES = "/dicom-web/studies"
SERIES = "/dicom-web/series"
INSTANCES = "/dicom-web/instances"
FUZZY = f"{STUDIES}?fuzzymatching=true&"


def uids(count: int) -> str:
    return ",".join(f"1.2.{n}" for n in range(count))


# (id, url, status, words the answer's text must hold)
QUERIES = [
    ("offset-30-nines", f"{STUDIES}?offset={'9' * 30}", 400, ["offset", "100000"]),
    ("offset-past-limit", f"{STUDIES}?offset=100001", 400, ["offset", "100000"]),
    ("offset-at-limit", f"{STUDIES}?offset=100000", 200, []),
    ("offset-negative", f"{STUDIES}?offset=-1", 400, ["offset", "non-negative"]),
    ("limit-30-nines", f"{STUDIES}?limit={'9' * 30}", 400, ["limit", "2147483647"]),
    ("limit-5000-digits", f"{STUDIES}?limit={'9' * 5000}", 400, ["limit", "2147483647"]),
    ("limit-at-limit", f"{STUDIES}?limit=2147483647", 200, []),
    ("limit-negative", f"{STUDIES}?limit=-1", 400, ["limit", "non-negative"]),
    ("limit-not-a-number", f"{STUDIES}?limit=ten", 400, ["limit", "'ten'"]),
    ("limit-unicode-digit", f"{STUDIES}?limit=%C2%B2", 400, ["limit", "non-negative"]),
    ("limit-given-twice", f"{STUDIES}?limit=1&limit=2", 400, ["limit", "more than once"]),
    ("fuzzy-2000-words", f"{FUZZY}PatientName={'ab+' * 2000}", 400, ["PatientName", "1024"]),
    ("fuzzy-17-words", f"{FUZZY}PatientName={'ab+' * 17}", 400, ["PatientName", "16 words"]),
    ("fuzzy-16-words", f"{FUZZY}PatientName={'ab+' * 16}", 200, []),
    ("fuzzy-referring-17-words", f"{FUZZY}ReferringPhysicianName={'a+' * 17}", 400,
     ["ReferringPhysicianName", "16 words"]),
    ("name-60kB", f"{STUDIES}?PatientName={'a' * 60_000}", 400, ["PatientName", "1024 characters"]),
    ("name-at-limit", f"{STUDIES}?PatientName={'a' * 1024}", 200, []),
    ("wildcards-10000", f"{STUDIES}?PatientName={'*?' * 5000}", 400, ["PatientName", "1024 characters"]),
    ("wildcards-1000", f"{STUDIES}?PatientName={'*?' * 500}", 200, []),
    ("description-60kB", f"{SERIES}?SeriesDescription={'*x' * 30_000}", 400, ["SeriesDescription", "1024"]),
    ("uids-1001", f"{STUDIES}?StudyInstanceUID={uids(1001)}", 400, ["StudyInstanceUID", "1000 values"]),
    ("uids-1000", f"{STUDIES}?StudyInstanceUID={uids(1000)}", 200, []),
    ("uids-backslash-5000", f"{SERIES}?SeriesInstanceUID={uids(5000).replace(',', '%5C')}", 400,
     ["SeriesInstanceUID", "1000 values"]),
    ("uid-list-without-values", f"{STUDIES}?StudyInstanceUID=%2C%2C", 400, ["StudyInstanceUID", "without"]),
    ("uid-with-newline", f"{STUDIES}?StudyInstanceUID=1.2.3%0A", 400, ["StudyInstanceUID", "not a UID"]),
    ("modalities-1001", f"{STUDIES}?ModalitiesInStudy={','.join(['CT'] * 1001)}", 400,
     ["ModalitiesInStudy", "1000 values"]),
    ("modality-list-without-values", f"{SERIES}?Modality=%2C", 400, ["Modality", "without values"]),
    ("includefield-257", f"{STUDIES}?includefield={','.join(['PatientName'] * 257)}", 400,
     ["includefield", "256"]),
    ("includefield-257-parameters", f"{STUDIES}?" + "&".join(["includefield=00100010"] * 257), 400,
     ["includefield", "256"]),
    ("includefield-256", f"{STUDIES}?includefield={','.join(['PatientName'] * 256)}", 200, []),
    ("includefield-negative-tag", f"{STUDIES}?includefield=-0000001", 400, ["-0000001", "unknown attribute"]),
    ("includefield-hex-prefix", f"{STUDIES}?includefield=0x100010", 400, ["0x100010", "unknown attribute"]),
    ("series-number-past-is", f"{SERIES}?SeriesNumber=2147483648", 400, ["SeriesNumber", "2147483647"]),
    ("series-number-50-digits", f"{SERIES}?SeriesNumber={'9' * 50}", 400, ["SeriesNumber", "2147483647"]),
    ("series-number-underscore", f"{SERIES}?SeriesNumber=1_0", 400, ["SeriesNumber", "integer"]),
    ("series-number-signed", f"{SERIES}?SeriesNumber=%2B1", 200, []),
    ("rows-past-us", f"{INSTANCES}?Rows=65536", 400, ["Rows", "65535"]),
    ("rows-negative", f"{INSTANCES}?Rows=-1", 400, ["Rows", "0 to 65535"]),
    ("date-with-newline", f"{STUDIES}?StudyDate=20240101%0A", 400, ["StudyDate", "not a valid DA"]),
    ("key-with-brackets", f"{STUDIES}?PatientName%5B0%5D=x", 400, ["PatientName[0]", "unknown attribute"]),
    ("key-nested", f"{STUDIES}?00100010.00100020=x", 400, ["sequence attribute paths"]),
    ("key-empty", f"{STUDIES}?=x", 400, ["unknown attribute"]),
    ("key-5000-characters", f"{STUDIES}?{'K' * 5000}=x", 400, ["5000 characters", "unknown attribute"]),
]  # fmt: skip


@pytest.mark.parametrize("url,status,words", [q[1:] for q in QUERIES], ids=[q[0] for q in QUERIES])
def test_query_parameters_are_bounded(client, url, status, words):
    response = client.get(url)
    assert response.status_code == status, response.text[:300]
    for word in words:
        assert word in response.text, (word, response.text[:300])
    assert len(response.text) < 2000 or status == 200, "an error message must not echo a huge value"


def _multiframe(datasets):
    return next(ds for ds in datasets.values() if int(ds.get("NumberOfFrames", 1) or 1) == 5)


def _single(datasets):
    return next(ds for ds in datasets.values() if "NumberOfFrames" not in ds)


# (id, suffix of an instance's URL, instance: "single" | "five", status, words)
RETRIEVES = [
    ("frames-duplicate", "/frames/1,1", "single", 400, ["frame 1", "twice", "PS3.18"]),
    ("frames-10000-copies", "/frames/" + ",".join(["1"] * 10_000), "single", 400, ["frame 1", "twice"]),
    ("frames-past-10000", "/frames/" + ",".join(["1"] * 10_001), "single", 400, ["at most 10000 frames"]),
    ("frames-more-than-the-instance", "/frames/1,2,3,4,5,6", "five", 404, ["frame 6", "5 frame(s)"]),
    ("frames-shuffled-whole", "/frames/5,3,1,2,4", "five", 200, []),
    ("frames-duplicate-multiframe", "/frames/2,3,2", "five", 400, ["frame 2", "twice"]),
    ("frame-5000-digits", "/frames/" + "9" * 5000, "single", 400, ["not a frame number", "5000 characters"]),
    ("frame-past-is", "/frames/2147483648", "single", 400, ["not a frame number", "2147483647"]),
    ("frame-unicode-digit", "/frames/%C2%B2", "single", 400, ["not a frame number"]),
    ("frame-zero", "/frames/0", "single", 400, ["not a frame number"]),
    ("bulk-tag-too-long", "/bulk/FFFFFFFFFF", "single", 400, ["bulk data path", "8 hex digits"]),
    ("bulk-negative-index", "/bulk/00081111/-1/00081150", "single", 400, ["bulk data path"]),
    ("bulk-33-sequences", "/bulk/" + "00081111/0/" * 33 + "00081150", "single", 400, ["32 sequences"]),
    ("bulk-32-sequences", "/bulk/" + "00081111/0/" * 32 + "00081150", "single", 404, ["no bulk data"]),
    ("bulk-pixel-data-whole", "/bulk/7FE00010", "five", 200, []),
]  # fmt: skip


@pytest.mark.parametrize(
    "suffix,which,status,words", [r[1:] for r in RETRIEVES], ids=[r[0] for r in RETRIEVES]
)
def test_frame_lists_and_bulk_paths_are_bounded(client, datasets, suffix, which, status, words):
    ds = _multiframe(datasets) if which == "five" else _single(datasets)
    response = client.get(instance_url(ds) + suffix, headers={"Accept": ANY_FRAME})
    assert response.status_code == status, response.text[:300]
    for word in words:
        assert word in response.text, (word, response.text[:300])
    if status == 200:
        assert len(parts(response)) == 5  # each frame once, whatever the order asked
    else:
        assert len(response.text) < 1000


# (id, Accept header, status, words): on an instance's metadata and on its frames.
ACCEPTS = [
    ("accept-8193-characters", "*/*," + " " * 8189, 400, ["Accept", "8192 characters"]),
    ("accept-65-ranges", ", ".join(f"image/x{n}" for n in range(65)), 400, ["Accept", "64 media ranges"]),
    ("accept-2000-ranges", ", ".join(f"image/x{n}" for n in range(2000)), 400, ["Accept", "8192"]),
    ("accept-17-parameters", "*/*" + "; a=b" * 17, 400, ["Accept", "16 parameters"]),
    ("accept-3000-parameters", "*/*" + "; a=b" * 1500, 400, ["Accept"]),
    ("accept-64-ranges", ", ".join(["*/*"] * 64), 200, []),
    ("accept-q-nan", "*/*; q=nan", 400, ["q='nan'", "from 0 to 1"]),
    ("accept-q-infinite", "*/*; q=1e400", 400, ["q='1e400'", "from 0 to 1"]),
    ("accept-q-above-one", "*/*; q=2", 400, ["from 0 to 1"]),
    ("accept-q-negative", "*/*; q=-0.5", 400, ["from 0 to 1"]),
]  # fmt: skip


@pytest.mark.parametrize("resource", ["/metadata", "/frames/1"])
@pytest.mark.parametrize("accept,status,words", [a[1:] for a in ACCEPTS], ids=[a[0] for a in ACCEPTS])
def test_accept_headers_are_bounded(client, datasets, resource, accept, status, words):
    response = client.get(instance_url(_single(datasets)) + resource, headers={"Accept": accept})
    assert response.status_code == status, response.text[:300]
    for word in words:
        assert word in response.text, (word, response.text[:300])


@pytest.mark.parametrize("resource", ["/series/{uid}/instances", "/series/{uid}/metadata"])
def test_a_huge_uid_in_the_path_is_cut_in_the_answer(client, datasets, resource):
    study = next(iter(datasets.values())).StudyInstanceUID
    response = client.get(f"{STUDIES}/{study}" + resource.format(uid="1" * 60_000))
    assert response.status_code == 404
    assert "60000 characters" in response.text and len(response.text) < 1000


@pytest.mark.parametrize("size", [10, 40_000], ids=["10-values", "40000-values"])
def test_a_restriction_of_any_size_is_one_query(gateway, size):
    """The access policy's restriction (an organization's grants may cover thousands of patients,
    and hide thousands of studies) is bound as one array past a few values: SQLite takes at most
    32,766 parameters in a statement and PostgreSQL 65,535."""
    registry = gateway.registry
    everything = {row[0] for row in registry.query("SELECT StudyInstanceUID FROM studies")}
    ins, study = registry.query(
        "SELECT p.INS, st.StudyInstanceUID FROM studies st JOIN patients p ON p.id = st.patient "
        "WHERE p.INS IS NOT NULL"
    )[0]
    theirs = {r[0] for r in registry.query("SELECT StudyInstanceUID FROM studies st JOIN patients p ON "
                                           "p.id = st.patient WHERE p.INS = ?", (ins,))}  # fmt: skip
    patients = frozenset({ins, *(f"X{n}" for n in range(size))})
    hidden = frozenset({study, *(f"9.{n}" for n in range(size))})
    query = replace(parse_qido([], "study"), restriction=Restriction(patients=patients, hidden=hidden))
    sql, params, _ = plan_query(registry, query)
    assert len(params) < 100
    found = {row["StudyInstanceUID"] for row in registry.query(sql, params)}
    assert found == theirs - {study}
    assert found < everything
