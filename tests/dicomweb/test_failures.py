"""Sources that change under the index: refusals before the first byte, aborts after it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from gateway.dicomweb.app import create_app
from gateway.service import Gateway
from tests.conftest import Client, fixture_files, make_config
from tests.dicomweb.test_retrieve import ANY_FRAME, ANY_INSTANCE, instance_url


@pytest.fixture
def setup(tmp_path: Path):
    folder = tmp_path / "archive"
    folder.mkdir()
    multiframe = next(p for p in fixture_files() if "native_multiframe" in p.name)
    single = fixture_files()[0]
    for path in (multiframe, single):
        shutil.copy(path, folder / path.name)
    gw = Gateway(make_config(folder, tmp_path / "registry.db", "archive"))
    gw.harvest("archive")
    return Client(create_app(gw)), folder / multiframe.name, folder / single.name


def test_a_file_gone_since_harvest_gets_404_before_any_byte(setup):
    client, _, single = setup
    ds = pydicom.dcmread(single)
    single.unlink()
    response = client.get(instance_url(ds) + "/frames/1", headers={"Accept": ANY_FRAME})
    assert response.status_code == 404
    assert "file is gone" in response.text


def test_a_file_cut_short_since_harvest_aborts_the_transfer_instead_of_ending_it(setup):
    client, multiframe, _ = setup
    ds = pydicom.dcmread(multiframe)
    data = multiframe.read_bytes()
    multiframe.write_bytes(data[: len(data) - len(ds.PixelData) // 2])  # later frames are missing
    numbers = ",".join(str(n) for n in range(1, int(ds.NumberOfFrames) + 1))
    with pytest.raises(Exception) as aborted:
        client.get(instance_url(ds) + f"/frames/{numbers}", headers={"Accept": ANY_FRAME})
    causes = []
    error: BaseException | None = aborted.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__
    assert any("shorter than indexed" in cause for cause in causes)


def test_the_app_keeps_serving_after_a_failed_transfer(setup):
    client, multiframe, single = setup
    test_a_file_cut_short_since_harvest_aborts_the_transfer_instead_of_ending_it((client, multiframe, single))
    ds = pydicom.dcmread(single)
    response = client.get(instance_url(ds), headers={"Accept": ANY_INSTANCE})
    assert response.status_code == 200
