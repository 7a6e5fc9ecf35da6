"""Our raw-element DICOM JSON encoder against pydicom's ``to_json_dict``, on every fixture and on
pydicom's own sample files. Three differences are intended, each per PS3.18 Annex F:
an empty sequence has no "Value" (F.2.5), an empty value among several is null (F.2.5), and
leading/trailing spaces of a value are not kept (PS3.5 6.2: they are padding)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

import gateway.codec.dicomfile  # noqa: F401  (sets pydicom's validation mode as the gateway does)
from gateway.codec.dicomjson import INLINE_LIMIT, dataset_json
from gateway.errors import DicomFileError
from tests.conftest import fixture_files

SAMPLES = Path(get_testdata_file("CT_small.dcm")).parent


def readable(paths):
    out = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pydicom.dcmread(path, stop_before_pixels=True).to_json_dict(INLINE_LIMIT, lambda e: "")
        except Exception:
            continue  # pydicom cannot read it either: nothing to compare with
        out.append(path)
    return out


FILES = readable(fixture_files() + sorted(SAMPLES.rglob("*.dcm")))


def normalise(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("Value") == []:
            value = {k: v for k, v in value.items() if k != "Value"}
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_encoder_agrees_with_pydicom(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pydicom.dcmread(path, stop_before_pixels=True).to_json_dict(INLINE_LIMIT, lambda e: "BULK")
        ours = dataset_json(pydicom.dcmread(path, stop_before_pixels=True), lambda p: "BULK")
    assert normalise(ours) == normalise(theirs)


def test_bulk_uris_name_the_tag_path_inside_sequences():
    ds = pydicom.Dataset()
    item = pydicom.Dataset()
    item.add_new(0x00091001, "OB", b"\x01" * (INLINE_LIMIT + 1))
    ds.add_new(0x00091000, "SQ", pydicom.Sequence([pydicom.Dataset(), item]))
    body = dataset_json(ds, lambda p: "bulk/" + p)
    assert body["00091000"]["Value"][1]["00091001"]["BulkDataURI"] == "bulk/00091000/1/00091001"


def test_nesting_beyond_any_real_iod_is_refused():
    ds = inner = pydicom.Dataset()
    for _ in range(40):
        child = pydicom.Dataset()
        inner.ContentSequence = pydicom.Sequence([child])
        inner = child
    with pytest.raises(DicomFileError, match="nested deeper"):
        dataset_json(ds, lambda p: p)
