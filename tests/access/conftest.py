"""A gateway with access control on: an OpenID Connect issuer whose keys are in a JWKS file, a
portal issuer for patients, and three patients' studies (two with an INS, one without)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fixtures.generate import make_ct_study
from gateway.access.control import Access
from gateway.app import create_app
from gateway.config import load_config
from gateway.service import Gateway
from tests.backends import Databases
from tests.conftest import Client

NIR_OID = "1.2.250.1.213.1.4.8"
ALICE, BOB = "1800175123456", "2900275654321"  # INS of two patients
PSC, PORTAL = "https://psc.test/auth", "https://portal.test/auth"
# Software clients (an EHR, a RIS) with client-credentials tokens; their organizations are PSC's.
CLIENTS = "https://clients.test/auth"


@dataclass
class Site:
    client: Client
    access: Access
    studies: dict[str, str]  # name -> StudyInstanceUID
    token: Callable[..., str]

    def as_(self, token: str | None, **headers: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", **headers} if token else dict(headers)

    def get(self, url: str, token: str | None = None, **kwargs: Any) -> Any:
        return self.client.get(url, headers=self.as_(token, **kwargs.pop("headers", {})), **kwargs)

    def post(self, url: str, body: Any, token: str | None = None) -> Any:
        return self.client.request("POST", url, content=orjson.dumps(body), headers=self.as_(token))

    def delete(self, url: str, token: str | None = None) -> Any:
        return self.client.request("DELETE", url, headers=self.as_(token))

    def records(self) -> list[Any]:
        self.access.audit.flush()
        return list(reversed(self.access.store.audit()))


def _study(folder: Path, uid: str, patient_id: str, ins: str | None) -> None:
    for path in make_ct_study(folder / uid, n_instances=2, rows=16, cols=16, study_uid=uid):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.IssuerOfPatientID = patient_id, "SITE"
        if ins:
            item = Dataset()
            item.PatientID, item.IssuerOfPatientID = ins, NIR_OID
            ds.OtherPatientIDsSequence = Sequence([item])
        ds.save_as(path)


@pytest.fixture
def site(tmp_path: Path, registry_urls: Databases) -> Site:
    """On each registry backend (the access tables share a PostgreSQL registry's database)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (tmp_path / "jwks.json").write_bytes(orjson.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}))
    studies = {"alice-1": "1.2.826.0.1.1", "alice-2": "1.2.826.0.1.2", "bob": "1.2.826.0.1.3"}
    studies["nobody"] = "1.2.826.0.1.4"
    archive = tmp_path / "archive"
    _study(archive, studies["alice-1"], "A-1", ALICE)
    _study(archive, studies["alice-2"], "A-1", ALICE)
    _study(archive, studies["bob"], "B-1", BOB)
    _study(archive, studies["nobody"], "N-1", None)
    (tmp_path / "gateway.toml").write_text(
        f"""
[registry]
url = "{registry_urls.url(tmp_path / "registry.db")}"
[auth]
emergency_minutes = 60
cors_origins = ["https://viewer.example"]
[[auth.issuers]]
issuer = "{PSC}"
audience = "gateway"
jwks_file = "jwks.json"
role = "professional"
emergency_roles = ["samu"]
[[auth.issuers]]
issuer = "{PORTAL}"
audience = "gateway"
jwks_file = "jwks.json"
role = "patient"
[[auth.issuers]]
issuer = "{CLIENTS}"
audience = "gateway"
jwks_file = "jwks.json"
role = "system"
organizations_of = "{PSC}"
[[sources]]
name = "archive"
kind = "filesystem"
path = "archive"
"""
    )
    config = load_config(tmp_path / "gateway.toml", env={})
    gateway = Gateway(config)
    gateway.harvest("archive")
    access = Access(config, gateway.registry)

    def token(issuer: str = PSC, lifetime: float = 300, **claims: Any) -> str:
        now = time.time()
        payload = {"iss": issuer, "aud": "gateway", "iat": now, "exp": now + lifetime, **claims}
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})

    return Site(Client(create_app(gateway, access=access)), access, studies, token)
