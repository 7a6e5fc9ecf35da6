"""One person across sites: the French national identifier (INS) joins local patient IDs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fixtures.generate import make_ct_study
from gateway.app import create_app
from gateway.config import AuthConfig, Config, ServerConfig, SourceConfig
from gateway.registry.store import Registry
from gateway.service import Gateway
from tests.conftest import FIXTURES, Client, fixture_files

INS = "1234567890123"  # the INS the GW-0003 fixtures carry in OtherPatientIDsSequence
NIR_OID = "1.2.250.1.213.1.4.8"


@pytest.fixture
def client(tmp_path: Path) -> Client:
    site_a = tmp_path / "site-a"
    site_a.mkdir()
    for path in fixture_files():
        shutil.copy(path, site_a / path.name)
    site_b = tmp_path / "site-b"
    (other,) = make_ct_study(site_b, n_instances=1, rows=16, cols=16, study_uid="1.2.3.999")
    ds = pydicom.dcmread(other)
    ds.PatientID, ds.IssuerOfPatientID = "LOCAL-42", "SITE_B"  # a local ID at the other site
    item = Dataset()
    item.PatientID, item.IssuerOfPatientID = INS, NIR_OID
    ds.OtherPatientIDsSequence = Sequence([item])
    ds.save_as(other)
    config = Config(
        ServerConfig(),
        f"sqlite:///{tmp_path / 'registry.db'}",
        (SourceConfig("a", "filesystem", site_a), SourceConfig("b", "filesystem", site_b)),
        auth=AuthConfig(open=True),
    )
    gateway = Gateway(config)
    gateway.harvest("a")
    gateway.harvest("b")
    return Client(create_app(gateway))


def studies(client: Client, query: str) -> set[str]:
    response = client.get(f"/dicom-web/studies?{query}")
    assert response.status_code == 200, response.text
    return {item["0020000D"]["Value"][0] for item in response.json()}


def site_a_studies_of(patient_id: str) -> set[str]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
        for p in fixture_files()
        if pydicom.dcmread(p, stop_before_pixels=True).PatientID == patient_id
    }


def test_an_ins_with_its_issuer_finds_the_persons_studies_at_every_site(client):
    found = studies(client, f"PatientID={INS}&IssuerOfPatientID={NIR_OID}")
    assert found == site_a_studies_of("GW-0003") | {"1.2.3.999"}


def test_an_ins_alone_finds_them_too(client):
    assert studies(client, f"PatientID={INS}") == site_a_studies_of("GW-0003") | {"1.2.3.999"}


def test_a_local_id_finds_only_that_sites_studies(client):
    assert studies(client, "PatientID=LOCAL-42") == {"1.2.3.999"}
    assert studies(client, "PatientID=GW-0003") == site_a_studies_of("GW-0003")


def test_a_registry_of_another_schema_version_is_emptied_for_harvest_to_refill(tmp_path):
    registry = Registry(tmp_path / "r.db")
    gateway = Gateway(
        Config(
            ServerConfig(),
            registry.url,
            (SourceConfig("a", "filesystem", FIXTURES),),
            auth=AuthConfig(open=True),
        ),
        registry,
    )
    gateway.harvest("a")  # patients, studies, ...: rows that refer to each other
    with registry.transaction() as conn:
        conn.execute("CREATE TABLE unrelated (x)")
    registry.db._conn().execute("PRAGMA user_version = 1")  # written by another schema version
    registry.close()
    again = Registry(tmp_path / "r.db")
    assert again.query("SELECT COUNT(*) FROM sources")[0][0] == 0
    tables = {row[0] for row in again.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "unrelated" in tables  # only the registry's own tables are rebuilt
