"""For tests against a real ``gateway serve``: a portal (patients) and a Pro Santé Connect
(professionals) issuer sharing one key in a JWKS file, and a study whose patient has an INS."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pydicom
from cryptography.hazmat.primitives.asymmetric import rsa
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fixtures.generate import make_ct_study

__all__ = ["PORTAL", "PSC", "Issuers", "issuers", "study_with_ins"]

PORTAL, PSC = "https://portal.test", "https://psc.test"
NIR_OID = "1.2.250.1.213.1.4.8"  # the INS's issuer


@dataclass(frozen=True)
class Issuers:
    auth: str  # the [auth] section naming both issuers
    token: Callable[..., str]  # token(issuer, lifetime=600, **claims)


def issuers(work: Path) -> Issuers:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (work / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k", "alg": "RS256"}]}))
    auth = "[auth]\n" + "".join(
        f'[[auth.issuers]]\nissuer = "{issuer}"\naudience = "gateway"\n'
        f'jwks_file = "{work / "jwks.json"}"\nrole = "{role}"\n'
        for issuer, role in ((PORTAL, "patient"), (PSC, "professional"))
    )

    def token(issuer: str, lifetime: float = 600, **claims: Any) -> str:
        payload = {"iss": issuer, "aud": "gateway", "exp": time.time() + lifetime, **claims}
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k"})

    return Issuers(auth, token)


def study_with_ins(folder: Path, ins: str, seed: int) -> str:
    """A two-instance study in ``folder`` whose patient carries ``ins``; its StudyInstanceUID."""
    for path in make_ct_study(folder, n_instances=2, rows=16, cols=16, seed=seed):
        ds = pydicom.dcmread(path)
        item = Dataset()
        item.PatientID, item.IssuerOfPatientID = ins, NIR_OID
        ds.OtherPatientIDsSequence = Sequence([item])
        ds.save_as(path)
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
