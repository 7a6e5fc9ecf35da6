"""BulkDataURIs for large binary values, top-level and nested, lead back to their bytes."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fixtures.generate import make_ct_study
from gateway.app import create_app
from gateway.service import Gateway
from tests.conftest import Client, make_config
from tests.helpers import ANY_FRAME, instance_url, parts


def test_bulk_uris_top_level_and_nested_serve_the_values(tmp_path: Path):
    folder = tmp_path / "archive"
    (path,) = make_ct_study(folder, n_instances=1, rows=16, cols=16)
    ds = pydicom.dcmread(path)
    icc = bytes(range(256)) * 8  # 2 KiB: above the inline limit
    ds.ICCProfile = icc
    item = Dataset()
    item.add_new(0x00091010, "LO", "GATEWAY TEST")
    item.add_new(0x00091011, "OB", bytes(reversed(icc)))
    ds.add_new(0x00091000, "LO", "GATEWAY TEST")  # private creator
    ds.add_new(0x00091001, "SQ", Sequence([Dataset(), item]))
    ds.save_as(path)
    gw = Gateway(make_config(folder, tmp_path / "registry.db", "archive"))
    gw.harvest("archive")
    client = Client(create_app(gw))

    (metadata,) = client.get(instance_url(ds) + "/metadata").json()
    top = metadata["00282000"]["BulkDataURI"]
    nested = metadata["00091001"]["Value"][1]["00091011"]["BulkDataURI"]
    assert top == "http://gateway.test" + instance_url(ds) + "/bulk/00282000"
    assert nested == "http://gateway.test" + instance_url(ds) + "/bulk/00091001/1/00091011"
    for uri, expected in ((top, icc), (nested, bytes(reversed(icc)))):
        response = client.get(uri.removeprefix("http://gateway.test"), headers={"Accept": ANY_FRAME})
        assert response.status_code == 200
        ((_, payload),) = parts(response)
        assert payload == expected
