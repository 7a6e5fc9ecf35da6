"""Sources that change under the index: refusals before the first byte, aborts after it."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from fixtures.generate import make_ct_study
from gateway.app import create_app
from gateway.service import Gateway
from tests.conftest import Client, make_config
from tests.helpers import ANY_FRAME, ANY_INSTANCE, instance_url


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Client, list[Path]]:
    folder = tmp_path / "archive"
    files = make_ct_study(folder, n_instances=4, rows=64, cols=64)
    gw = Gateway(make_config(folder, tmp_path / "registry.db", "archive"))
    gw.harvest("archive")
    return Client(create_app(gw)), sorted(files)


def cut(path: Path, missing: int) -> None:
    path.write_bytes(path.read_bytes()[:-missing])


def causes(error: BaseException | None) -> list[str]:
    out = []
    while error is not None:
        out.append(str(error))
        error = error.__cause__
    return out


def test_a_file_gone_since_harvest_gets_404_before_any_byte(setup):
    client, files = setup
    ds = pydicom.dcmread(files[0])
    files[0].unlink()
    response = client.get(instance_url(ds) + "/frames/1", headers={"Accept": ANY_FRAME})
    assert response.status_code == 404
    assert "file is gone" in response.text


def test_a_frame_cut_short_since_harvest_gets_502_before_any_byte(setup):
    client, files = setup
    ds = pydicom.dcmread(files[0])
    cut(files[0], 100)
    response = client.get(instance_url(ds) + "/frames/1", headers={"Accept": ANY_FRAME})
    assert response.status_code == 502
    assert "changed since it was indexed (shrank" in response.text


def test_a_study_whose_later_file_shrank_aborts_the_transfer_instead_of_ending_it(setup):
    client, files = setup
    ds = pydicom.dcmread(files[-1])
    cut(files[-1], 100)  # the first instances stream fine, then the source falls short
    with pytest.raises(Exception) as aborted:
        client.get(f"/dicom-web/studies/{ds.StudyInstanceUID}", headers={"Accept": ANY_INSTANCE})
    assert any("changed since it was indexed (shrank" in cause for cause in causes(aborted.value))


def test_the_app_keeps_serving_after_a_failed_transfer(setup):
    client, files = setup
    ds = pydicom.dcmread(files[-1])
    cut(files[-1], 100)
    with pytest.raises(Exception) as aborted:
        client.get(f"/dicom-web/studies/{ds.StudyInstanceUID}", headers={"Accept": ANY_INSTANCE})
    assert any("shrank" in cause for cause in causes(aborted.value))
    response = client.get(instance_url(pydicom.dcmread(files[0])), headers={"Accept": ANY_INSTANCE})
    assert response.status_code == 200
