"""Malformed requests of every shape: never a 500, always a message (seeded, so repeatable)."""

from __future__ import annotations

import random
import string
from urllib.parse import quote

import pytest

from tests.helpers import instance_url

KEYS = [
    "PatientName",
    "PatientID",
    "StudyDate",
    "StudyTime",
    "00100010",
    "0020000D",
    "Modality",
    "ModalitiesInStudy",
    "SeriesNumber",
    "InstanceNumber",
    "includefield",
    "limit",
    "offset",
    "fuzzymatching",
    "AccessionNumber",
    "SOPInstanceUID",
    "Rows",
    "xx",
    "",
    "7FE00010",
]
PIECES = [
    "*",
    "?",
    "-",
    ",",
    "\\",
    "=",
    "^",
    "%",
    "%00",
    "..",
    "1.2.3",
    "20240101",
    "2024",
    "'",
    '"',
    "é",
    "山田",
    "\x00",
    "true",
    " ",
    "-1",
    "99999999999999999999",
    "[",
    "]",
    "all",
    "²",
    "1_0",
    "-0000001",
    "FFFFFFFFFF",
    "9" * 5000,
    "*?" * 600,
]
ACCEPTS = [
    None,
    "*/*",
    "garbage",
    "multipart/related",
    'multipart/related; type="application/dicom"',
    "multipart/related; type=application/octet-stream; transfer-syntax=*",
    "image/jpeg; q=x",
    'multipart/related; type="image/jp2"; transfer-syntax=1.2.3',
    "application/dicom+json;;;",
    'multipart/related; type="a;b"; q=0.5, */*; q=0',
]


def noise(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES + list(string.ascii_letters)) for _ in range(rng.randint(0, 6)))


def requests(seed: int, count: int, real: str):
    rng = random.Random(seed)
    for _ in range(count):
        params = "&".join(f"{quote(rng.choice(KEYS))}={quote(noise(rng))}" for _ in range(rng.randint(0, 4)))
        uid = rng.choice(["1.2.826.0.1.3680043.10.1234.1.1", "1.2", noise(rng) or "x"])
        path = rng.choice(
            [
                "/dicom-web/studies",
                "/dicom-web/series",
                "/dicom-web/instances",
                f"/dicom-web/studies/{quote(uid)}",
                f"/dicom-web/studies/{quote(uid)}/metadata",
                f"/dicom-web/studies/{quote(uid)}/series/{quote(uid)}/instances/{quote(uid)}/frames/{quote(noise(rng))}",
                f"/dicom-web/studies/{quote(uid)}/series/{quote(uid)}/instances/{quote(uid)}/bulk/{quote(noise(rng))}",
                f"/dicom-web/studies/{quote(uid)}/series",
                f"/{quote(noise(rng))}",
                f"{real}/frames/{quote(noise(rng))}",
                f"{real}/bulk/{quote(noise(rng))}",
                real,
            ]
        )
        headers = {}
        accept = rng.choice(ACCEPTS)
        if accept is not None:
            headers["Accept"] = accept
        yield f"{path}?{params}" if params else path, headers


@pytest.mark.parametrize("seed", range(4))
def test_no_malformed_request_gets_a_500(client, datasets, seed):
    ds = next(iter(datasets.values()))
    real = instance_url(ds)
    for url, headers in requests(seed, 150, real):
        response = client.get(url, headers=headers)
        assert response.status_code < 500, (url, headers, response.text)
        if response.status_code >= 400:
            assert response.text.strip(), (url, "an error without a message")
