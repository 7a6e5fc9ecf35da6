#!/usr/bin/env python3
"""A seeded request fuzzer over every route of the gateway, against a real ``gateway serve``.

Run from the repository root with the project's venv::

    .venv/bin/python bench/fuzz.py                       # 100,000 cases, seed 0
    .venv/bin/python bench/fuzz.py --cases 10000 --seed 7

It writes a site into the work dir (OpenID Connect issuers with keys in a JWKS file, patients'
studies, a copy of the bundled fixtures given the patients' INS, a stand-in viewer), starts
``gateway serve`` on a free loopback port and sends generated requests one after the other, over
the routes of the application's own route table (``create_app(...).starlette``): a new route is
fuzzed without being listed here. What each case is made of, the invariants checked (no 5xx,
answers within ``SLOW``, the server still serves, one audit record per audited request) and the
output: bench/README.md. ``tests/security/test_fuzz_routes.py`` runs the same generator
in-process in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

# `bench` and `fixtures` are not installed packages: make them importable when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import httpx
import jwt
import orjson
import pydicom
from cryptography.hazmat.primitives.asymmetric import rsa
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from starlette.routing import Mount, Route

from bench.common import OUT_DIR, REPO, log, percentile

__all__ = [
    "Case", "Generator", "Outcome", "Report", "RouteSpec", "Site", "SLOW",
    "audited", "route_specs", "run_cases", "still_serves", "write_site", "main",
]  # fmt: skip

SLOW = 2.0  # seconds: a slower answer is a finding
ORIGIN = "https://viewer.example"  # the site's allowed CORS origin
NIR_OID = "1.2.250.1.213.1.4.8"
# The patients' INS. Carol has no studies; Dora is the bundled fixtures' patient with an INS.
ALICE, BOB, CAROL, DORA = "1800175123456", "2900275654321", "2750575000111", "1234567890123"
PSC, PORTAL = "https://psc.test/auth", "https://portal.test/auth"
SESSION_COOKIE = "gateway_session"
# The bundled fixtures' patients as the site's: their files get these INS in the site's copy.
_FIXTURE_PATIENTS = {"GW-0001": ALICE, "GW-0002": BOB, "GW-0003": DORA, "GW-0004": None}
# Whose studies each caller may see once the setup requests have run (see Generator.setup).
_SEES = {"alice": {ALICE}, "bob": {BOB}, "dora": {DORA}, "doctor": {ALICE, DORA}, "samu": {BOB}}

# -- the site ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop: str
    frames: int
    ins: str | None  # its patient's


@dataclass
class Site:
    """What the fuzzer knows of the gateway it runs against: its files, keys and studies."""

    root: Path
    config: Path
    key: rsa.RSAPrivateKey
    studies: dict[str, str]  # name -> StudyInstanceUID
    instances: list[Instance]

    def token(self, issuer: str = PSC, lifetime: float = 4 * 3600, **claims: Any) -> str:
        now = time.time()
        payload = {"iss": issuer, "aud": "gateway", "iat": now, "exp": now + lifetime, **claims}
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": "k1"})

    def credentials(self) -> dict[str, str]:
        """Bearer tokens by name: the site's people, and tokens that must be refused."""
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        claims = {"iss": PSC, "aud": "gateway", "exp": time.time() + 3600, "sub": "10001"}
        return {
            "alice": self.token(PORTAL, sub="patient-alice", ins=ALICE),
            "bob": self.token(PORTAL, sub="patient-bob", ins=BOB),
            "carol": self.token(PORTAL, sub="patient-carol", ins=CAROL),
            "dora": self.token(PORTAL, sub="patient-dora", ins=DORA),
            "doctor": self.token(PSC, sub="10001", organization="750000001", roles=["radiologist"]),
            "stranger": self.token(PSC, sub="10009", organization="750000009", roles=["radiologist"]),
            "samu": self.token(PSC, sub="20002", organization="750000002", roles=["samu"]),
            "expired": self.token(PSC, lifetime=-600, sub="10001"),
            "wrong-audience": self.token(PSC, sub="10001", aud="someone-else"),
            "unknown-issuer": self.token("https://evil.test", sub="10001"),
            "patient-without-ins": self.token(PORTAL, sub="patient-x"),
            "huge-claims": self.token(PSC, sub="1" * 20_000, roles=["r"] * 2_000),
            "forged": jwt.encode(claims, other, algorithm="RS256", headers={"kid": "k1"}),
            "unsigned": jwt.encode(claims, "", algorithm="none"),
        }


def _with_ins(ds: Dataset, ins: str | None) -> None:
    if ins:
        item = Dataset()
        item.PatientID, item.IssuerOfPatientID = ins, NIR_OID
        ds.OtherPatientIDsSequence = Sequence([item])


def _studies(root: Path, studies: dict[str, str]) -> None:
    """The site's own studies, and its copy of the bundled fixtures with the patients' INS."""
    from fixtures.generate import make_ct_study

    archive = root / "archive"
    for name, patient_id, ins in (("alice-1", "A-1", ALICE), ("alice-2", "A-1", ALICE),
                                  ("bob", "B-1", BOB), ("nobody", "N-1", None)):  # fmt: skip
        for path in make_ct_study(archive / studies[name], n_instances=2, rows=16, cols=16,
                                  study_uid=studies[name]):  # fmt: skip
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.IssuerOfPatientID = patient_id, "SITE"
            _with_ins(ds, ins)
            ds.save_as(path)
    copy = root / "fixtures"
    shutil.copytree(REPO / "fixtures" / "dicom", copy)
    for path in copy.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        _with_ins(ds, _FIXTURE_PATIENTS.get(str(ds.PatientID)))
        ds.save_as(path)


def write_site(root: Path, registry_url: str | None = None, port: int = 8080) -> Site:
    """A gateway configuration with access control, and its studies (see the module docstring).
    ``registry_url``: default a SQLite file in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (root / "jwks.json").write_bytes(orjson.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}))
    studies = {"alice-1": "1.2.826.0.1.1", "alice-2": "1.2.826.0.1.2", "bob": "1.2.826.0.1.3"}
    studies["nobody"] = "1.2.826.0.1.4"
    if not (root / "archive").is_dir():
        _studies(root, studies)
    viewer = root / "data" / "viewer"  # a stand-in for OHIF's files, so the viewer's routes serve
    viewer.mkdir(parents=True, exist_ok=True)
    (viewer / "index.html").write_text('<script src="/app.bundle.0123456789abcdef.js"></script>')
    (viewer / "app.bundle.0123456789abcdef.js").write_text('__webpack_require__.p = "/";\n')
    (viewer / "app.css").write_text("body { background: url(/logo.png) }\n")
    (viewer / "codec.wasm").write_bytes(b"\x00asm\x01\x00\x00\x00")
    issuers = "".join(
        f'[[auth.issuers]]\nissuer = "{issuer}"\naudience = "gateway"\njwks_file = "jwks.json"\n'
        f'role = "{role}"\n' + ('emergency_roles = ["samu"]\n' if role == "professional" else "")
        for issuer, role in ((PSC, "professional"), (PORTAL, "patient"))
    )
    sources = "".join(
        f'[[sources]]\nname = "{name}"\nkind = "filesystem"\npath = "{name}"\n'
        for name in ("archive", "fixtures")
    )
    config = root / "gateway.toml"
    default = f"sqlite:///{root / 'registry.db'}"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[registry]\nurl = "{registry_url or default}"\ndata_dir = "data"\n'
        f'[auth]\nemergency_minutes = 60\ncors_origins = ["{ORIGIN}"]\n{issuers}{sources}'
    )
    instances = []
    for path in sorted([*(root / "archive").rglob("*.dcm"), *(root / "fixtures").rglob("*.dcm")]):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        others = ds.get("OtherPatientIDsSequence") or []
        uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        frames = int(ds.get("NumberOfFrames") or 1) if "Rows" in ds else 0
        instances.append(Instance(*uids, frames, str(others[0].PatientID) if others else None))
    return Site(root, config, key, studies, instances)


# -- the route table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteSpec:
    path: str  # "/dicom-web/studies/{study}": parameters in braces
    methods: frozenset[str]
    params: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{','.join(sorted(self.methods))} {self.path}"


def route_specs(routes: list[Any], prefix: str = "") -> list[RouteSpec]:
    """Every route of a Starlette route table, mounts flattened; a mounted application without
    routes of its own (the viewer's files) is a route with one ``{path}`` parameter."""
    out: list[RouteSpec] = []
    for route in routes:
        if isinstance(route, Mount) and route.routes:
            out += route_specs(route.routes, prefix + route.path)
        elif isinstance(route, Mount):
            out.append(RouteSpec(prefix + route.path + "/{path}", frozenset({"GET", "HEAD"}), ("path",)))
        elif isinstance(route, Route):
            methods = frozenset(route.methods or {"GET", "HEAD"})
            out.append(RouteSpec(prefix + route.path_format, methods, tuple(route.param_convertors)))
    return out


def audited(method: str, path: str, headers: dict[str, str]) -> bool:
    """The audit rule: one record for every request except /health, the viewer and its files,
    and CORS preflights (OPTIONS from an allowed origin). ``path`` as the server sees it."""
    if path.rstrip("/") in ("/health", "/viewer") or path.startswith("/viewer/"):
        return False
    origin = next((v for k, v in headers.items() if k.lower() == "origin"), "")
    return not (method == "OPTIONS" and origin.rstrip("/") == ORIGIN)


# -- cases -----------------------------------------------------------------------------------------

_METHODS = ["GET", "POST", "DELETE", "PUT", "OPTIONS", "HEAD", "PATCH"]
_MAX_URL = 60_000  # httpx refuses longer URLs (65,536 characters)
_FIELD_JUNK = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_RUN = re.compile(r"(.{1,16}?)\1{7,}", re.DOTALL)  # a unit repeated 8 times or more
_JUNK = [
    "", "..", "../", "./", "%00", "%2e%2e", "%2F", "%ff", "%C0%AE", "\x00", "\x01", "\x1b[31m", "\x7f",
    "\r\n", "\t", " ", "'", '"', "`", ";", "--", "/*", "*", "?", "\\", ",", "=", "&", "#", "%", "{",
    "}", "[", "]", "<script>", "é", "ß", "山田", "\u202e", "\ufeff", "\U0001f600", "\u0301", "1.2.3",
    "0", "-1", "99999999999999999999", "1e308", "NaN", "true", "null", "²", "١٢", "0x10", "1_0",
]  # fmt: skip
_LONG = ["a", "9", "*?", "1.", "%00", "é", ",1", "\\", "a ", "/"]
_NAMES = ["DUPONT", "dup*", "*", "?", "müller^hélène", "Yamada^Tarou=山田^太郎", "^", "=", "a b c d e"]
_ACCEPTS = [  # what viewers and DICOMweb clients send
    "*/*", "multipart/related", 'multipart/related; type="application/dicom"', "application/json",
    "multipart/related; type=application/octet-stream; transfer-syntax=*", "application/dicom+json",
    'multipart/related; type="image/jpeg"', "multipart/related; type=application/dicom; transfer-syntax=*",
    'multipart/related; type="image/jls"', 'multipart/related; type="image/jp2"; transfer-syntax=*',
]  # fmt: skip
_BAD_ACCEPTS = [
    "garbage", 'multipart/related; type="image/jp2"; transfer-syntax=1.2.3', "application/dicom+xml",
    "image/jpeg; q=x", "application/dicom+json;;;", "text/html", "*/*; q=nan", "*/*; q=1e400", "*/*; q=-1",
    'multipart/related; type="a;b"; q=0.5, */*; q=0', "multipart/related; type=", ";;;", "*/*; q=0",
]  # fmt: skip
_QIDO_KEYS = [
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription",
    "ModalitiesInStudy", "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate",
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "NumberOfFrames", "00100010", "0020000D",
    "00100020", "includefield", "includefield", "limit", "offset", "fuzzymatching",
]  # fmt: skip
_API_KEYS = ["all", "format", "requestType", "studyUID", "patientID", "StudyInstanceUIDs", "mrn"]
_ODD_KEYS = ["a[b]", "a.b", "PatientName.0", "", "includefield[]", "%", "limit ", "PatientName[]"]
_KEYWORDS = sorted(keyword_dict)
_DATES = ["20240101", "20240101-", "-20231231", "2024", "-", "20240101-20240101-", "08-09", "20241399"]
_API_VALUES = ["STUDY", "PATIENT", "study", "SERIES", "json", "fhir", "dicom", "xml", "true", ""]
_CONTENT_TYPES = [
    "application/json", "application/dicom", "multipart/related; type=application/dicom",
    "application/x-www-form-urlencoded", "text/plain; charset=\u00e9",
]  # fmt: skip
_TAG_PATHS = [
    "7FE00010", "7fe00010", "00091234", "00081111/0/00081150", "00420011", "FFFFFFFFFF",
    "00081111/-1/00081150",
    "/".join(["00081111", "0"] * 40 + ["00081150"]),
]  # fmt: skip
_UID_PARAMS = {"study": "study", "uid": "study", "series": "series", "instance": "sop"}  # -> Instance
_VIEWER_FILES = [
    "", "index.html", "app-config.js", "app.bundle.0123456789abcdef.js", "app.css", "codec.wasm", "viewer",
    "../gateway.toml", "%2e%2e/jwks.json", "missing.js",
]  # fmt: skip


@dataclass
class Case:
    index: int
    route: str  # the route's name (methods and path template), or "junk"
    method: str
    url: str  # path and query, encoded as sent
    headers: dict[str, str]
    body: bytes | None = None

    def describe(self, room: int = 3000) -> str:
        """The request, to reproduce it: runs written ``{'unit'*count}``, and cut past ``room``."""

        def cut(text: str) -> str:
            text = _RUN.sub(lambda m: f"{{{m[1]!r}*{len(m[0]) // len(m[1])}}}", text)
            return text if len(text) <= room else f"{text[:room]}...[{len(text)} characters]"

        parts = [f"#{self.index} {self.method} {cut(self.url)}"]
        parts += [f"  {name}: {cut(value)}" for name, value in self.headers.items()]
        if self.body is not None:
            parts.append(f"  body ({len(self.body)} bytes): {cut(repr(self.body))}")
        return "\n".join(parts)


def _field(value: str) -> str:
    """A header value as an HTTP/1.1 client may send it (RFC 9110 5.5): no control character but
    tab, no blank at either end, non-ASCII characters as their UTF-8 bytes."""
    return _FIELD_JUNK.sub("", value).strip(" \t").encode().decode("latin-1")


class Generator:
    """Seeded cases over ``specs``; ``learn`` feeds what answers reveal into later cases."""

    def __init__(self, seed: int, specs: list[RouteSpec], site: Site, credentials: dict[str, str]) -> None:
        self.rng = random.Random(seed)
        self.specs = specs
        self.site = site
        self.credentials = credentials
        self.people = ["alice", "alice", "bob", "dora", "doctor", "doctor", "samu", "stranger", "carol"]
        self.secrets: list[str] = []
        self.ids: list[str] = []
        self.sessions: list[str] = []
        self.count = 0

    def setup(self) -> list[Case]:
        """Requests made first, so that grants, a link and an emergency access exist."""
        studies = self.site.studies
        made = [
            ("alice", "/api/grants", {"grantee": "10001"}),
            ("dora", "/api/grants", {"grantee": "org:750000001"}),
            ("alice", "/api/links", {"StudyInstanceUID": studies["alice-1"], "expires_in": 3600}),
            ("samu", "/api/emergency", {"patient": BOB, "reason": "unconscious patient, head trauma"}),
        ]
        bearer = {who: {"Authorization": f"Bearer {token}"} for who, token in self.credentials.items()}
        return [
            self._case("setup", "POST", path, bearer[who], orjson.dumps(body)) for who, path, body in made
        ]

    def _case(self, route: str, method: str, url: str, headers: dict[str, str], body: bytes | None) -> Case:
        self.count += 1
        headers = {name: _field(value) for name, value in headers.items()}
        return Case(self.count, route, method, url[:_MAX_URL], headers, body)

    def learn(self, case: Case, status: int, headers: httpx.Headers, body: bytes) -> None:
        if case.method == "POST" and status == 201:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                answer = orjson.loads(body)
                if isinstance(answer.get("id"), str):
                    self.ids.append(answer["id"])
                if isinstance(answer.get("url"), str) and "/link/" in answer["url"]:
                    self.secrets.append(answer["url"].rsplit("/", 1)[1])
        for cookie in headers.get_list("set-cookie"):
            if cookie.startswith(SESSION_COOKIE + "="):
                self.sessions.append(cookie.split(";", 1)[0].split("=", 1)[1])

    def case(self) -> Case:
        rng = self.rng
        who = rng.choice(self.people) if rng.random() < 0.6 else None
        spec = rng.choice(self.specs) if rng.random() < 0.95 else None
        if spec is None:
            path = rng.choice(["", "/dicom-web", "/api", "/link", "/viewer", "/dicom-web/studies"])
            path += "/" + self._encoded(self._junk())
        else:
            path = self._path(spec, who)
        methods = sorted(spec.methods) if spec else ["GET"]
        roll = rng.random()
        if roll < 0.8:  # mostly the route's own methods, GET first (HEAD answers have no body)
            method = "GET" if "GET" in methods and roll < 0.65 else rng.choice(methods)
        else:
            method = rng.choice(_METHODS)
        query = self._query(path)
        headers = self._headers(method, who)
        body = self._body() if method in ("POST", "PUT", "PATCH") or rng.random() < 0.03 else None
        if body is not None and rng.random() < 0.8:
            headers["Content-Type"] = rng.choice(_CONTENT_TYPES)
        url = path + (f"?{query}" if query else "")
        return self._case(spec.name if spec else "junk", method, url, headers, body)

    def _junk(self) -> str:
        rng = self.rng
        if rng.random() < 0.1:
            return rng.choice(_LONG) * rng.choice([100, 1_000, 4_000, 12_000])
        return "".join(rng.choice(_JUNK) for _ in range(rng.randint(0, 6)))

    def _encoded(self, value: str) -> str:
        # Mostly percent-encoded whole; sometimes with '%' and '/' as they are, so that "%2e%2e"
        # and "../" reach the server as such.
        return quote(value, safe="" if self.rng.random() < 0.8 else "%/:@,*")

    def _instance(self, who: str | None = None) -> Instance:
        """Mostly one the caller may see (when they may see any), else any."""
        seen = [i for i in self.site.instances if i.ins in _SEES.get(who or "", ())]
        return self.rng.choice(seen if seen and self.rng.random() < 0.8 else self.site.instances)

    def _path(self, spec: RouteSpec, who: str | None) -> str:
        rng = self.rng
        real, other = self._instance(who), self._instance()
        coherent = rng.random() < 0.5  # every UID of one instance, else each of its own kind
        values: dict[str, str] = {}
        for name in spec.params:
            roll = 0.0 if coherent else rng.random()
            if name in _UID_PARAMS:
                instance = real if roll < 0.5 else other
                value = getattr(instance, _UID_PARAMS[name]) if roll < 0.8 else self._junk()
            elif name == "frames":
                value = self._frames(real.frames)
            elif name == "tag_path":
                value = rng.choice([*_TAG_PATHS, self._junk()])
            elif name in ("id", "secret"):
                known = self.ids if name == "id" else self.secrets
                value = rng.choice(known) if known and roll < 0.5 else self._junk()
            elif name == "path":
                value = rng.choice([*_VIEWER_FILES, self._junk()])
            else:
                value = self._junk()
            values[name] = self._encoded(value)
        path = spec.path
        for name, value in values.items():
            path = path.replace("{" + name + "}", value)
        return path

    def _frames(self, count: int) -> str:
        rng = self.rng
        top = max(count, 1)
        some = rng.sample(range(1, top + 1), min(top, rng.randint(1, 5)))
        return rng.choice([
            "1", str(top), ",".join(map(str, some)), "1,1", ",".join(["1"] * rng.choice([10, 1000, 10_000])),
            ",".join(map(str, range(1, rng.choice([100, 3000])))), "0", str(top + 1),
            "9" * rng.choice([10, 30, 5000]),
            "²", " 1 ", "1,,2", self._junk(),
        ])  # fmt: skip

    def _query(self, path: str) -> str:
        rng = self.rng
        if rng.random() < 0.3:
            return ""
        pairs = []
        for _ in range(rng.choice([1, 1, 2, 3, 5, 40])):
            roll = rng.random()
            if roll < 0.55:
                key = rng.choice(_QIDO_KEYS if path.startswith("/dicom-web") else _API_KEYS)
            elif roll < 0.7:
                key = rng.choice(_KEYWORDS)
            elif roll < 0.8:
                key = f"{rng.getrandbits(32):08X}"
            else:
                key = rng.choice(_ODD_KEYS) if roll < 0.9 else self._junk()
            pairs.append(f"{quote(key, safe='')}={self._value(key)}")
            if rng.random() < 0.05:
                pairs.append(pairs[-1])  # a repeated key
        return "&".join(pairs)

    def _value(self, key: str) -> str:
        rng = self.rng
        if key in ("limit", "offset"):
            value = rng.choice(["0", "1", "101", "1000", "1001", "-1", "x", "", "9" * 30, "²", "2147483648"])
        elif key == "fuzzymatching":
            value = rng.choice(["true", "false", "yes", ""])
        elif key == "includefield":
            value = rng.choice([
                "all", "00081030", "StudyDescription,00080060", ",".join(["PatientName"] * 300), "-0000001",
                ",".join(rng.sample(_KEYWORDS, rng.choice([3, 300]))), "PixelData",
            ])  # fmt: skip
        elif key.endswith("UID") or key in ("0020000D", "studyUID", "StudyInstanceUIDs"):
            uids = [self._instance().study for _ in range(rng.choice([1, 2, 5]))]
            many = ",".join(f"1.2.{n}" for n in range(rng.choice([10, 5000])))
            value = rng.choice([",".join(uids), "\\".join(uids), many, ",", "1.2.abc", "1." * 40])
        elif "Name" in key or key == "00100010":
            words = " ".join(rng.choice(["ab", "mart", "é"]) for _ in range(rng.choice([1, 3, 17, 2000])))
            value = rng.choice([*_NAMES, words, "*?" * rng.choice([5, 600])])
        elif "Date" in key or "Time" in key:
            value = rng.choice(_DATES)
        elif key in ("PatientID", "00100020", "patientID", "mrn"):
            value = rng.choice(["A-1", ALICE, BOB, "GW-0002", "*"])
        elif key in ("requestType", "format", "all"):
            value = rng.choice(_API_VALUES)
        elif key in ("SeriesNumber", "InstanceNumber", "Rows", "NumberOfFrames"):
            value = rng.choice(["1", "-1", "65536", "9" * 50, "1_0", "²", " 7 ", "+3"])
        else:
            value = rng.choice([self.site.studies["alice-1"], "CT", "CT,MR", "1", self._junk()])
        if rng.random() < 0.15:
            value = self._junk()
        return quote(value, safe="" if rng.random() < 0.8 else ",\\*?^=")

    def _headers(self, method: str, who: str | None) -> dict[str, str]:
        rng = self.rng
        headers: dict[str, str] = {}
        roll = rng.random()
        if who is not None:
            headers["Authorization"] = f"Bearer {self.credentials[who]}"
        elif roll < 0.5:
            headers["Authorization"] = rng.choice([
                f"Bearer {self.credentials[rng.choice(sorted(self.credentials))]}", "Bearer", "Bearer ",
                "Basic dXNlcjpwYXNz", "bearer x", "Bearer " + "A" * rng.choice([100, 20_000]), "Bearer a.b.c",
                f"Bearer {self._junk()}",
            ])  # fmt: skip
        if rng.random() < 0.6:
            headers["Accept"] = rng.choice(_ACCEPTS if rng.random() < 0.7 else _BAD_ACCEPTS)
            if rng.random() < 0.05:
                headers["Accept"] = ", ".join(f"image/x{n}" for n in range(rng.choice([65, 2000])))
            elif rng.random() < 0.05:
                headers["Accept"] = "multipart/related" + "; a=b" * rng.choice([17, 3000])
        roll = rng.random()
        if roll < 0.1 and self.sessions:
            headers["Cookie"] = f"{SESSION_COOKIE}={rng.choice(self.sessions)}"
        elif roll < 0.2:
            headers["Cookie"] = rng.choice([
                f"{SESSION_COOKIE}=junk", f"{SESSION_COOKIE}=", "a=b; c", "=;=;", f'{SESSION_COOKIE}="x',
                f"{SESSION_COOKIE}=" + "x" * 8000, self._junk(),
            ])  # fmt: skip
        if method == "OPTIONS" or rng.random() < 0.05:
            headers["Origin"] = rng.choice([ORIGIN, ORIGIN + "/", "https://evil.test", "null", ""])
            if rng.random() < 0.5:
                headers["Access-Control-Request-Method"] = rng.choice(["GET", "POST", "DELETE"])
        for name, values in (
            ("X-Junk", ["j" * 100, "j" * 8000, "j" * 30_000]),
            ("X-Forwarded-For", ["1.2.3.4", "junk", "1.2.3.4, 5.6.7.8"]),
            ("Range", ["bytes=0-10", "bytes=-1", "bytes=99999999999999999999-", "junk"]),
            ("If-None-Match", ['"x"', "*", "j" * 5000]),
        ):
            if rng.random() < 0.03:
                headers[name] = rng.choice(values)
        return headers

    def _body(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            studies = self.site.studies
            pool: dict[str, list[Any]] = {
                "StudyInstanceUID": [studies["alice-1"], studies["bob"], "1.2.3", 7, None, [], "x" * 99_999],
                "expires_in": [3600, 1, 0, -1, 1e308, float("inf"), 10**30, "3600", True, None],
                "grantee": ["10001", "org:750000001", "pro:10009", "", 1, "x" * 70_000, self._junk()],
                "patient": [ALICE, BOB, CAROL, DORA, "", None, self._junk()],
                "reason": ["short", "unconscious patient, head trauma", "r" * 100_000, 5],
                self._junk(): [self._junk()],
            }  # fmt: skip
            chosen = rng.sample(sorted(pool), rng.randint(0, len(pool)))
            # json, not orjson: integers past 64 bits and Infinity (not JSON) are sent as they are
            return json.dumps({name: rng.choice(pool[name]) for name in chosen}, ensure_ascii=False).encode()
        if roll < 0.7:
            depth = rng.choice([10, 2000, 100_000])
            return b"[" * depth + b"]" * depth
        if roll < 0.8:
            return rng.choice([b"", b"null", b"[]", b'"x"', b"1e999999", b"{", b'{"a":1}' * 2, b"\xff\xfe"])
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([10, 1000, 70_000])))


# -- running ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    status: int  # 0: no answer (see error)
    seconds: float
    audited: bool  # the audit rule says this request gets a record
    reached_app: bool  # answered by the application (not refused by the HTTP server itself)
    error: str | None = None
    text: str = ""
    request_id: str | None = None  # the answer's X-Request-ID


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    audit_records: int = 0  # written during the run
    alive: bool = False
    alive_detail: str = ""

    @property
    def server_errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status >= 500 or o.status == 0]

    def slow(self, limit: float = SLOW) -> list[Outcome]:
        return [o for o in self.outcomes if o.seconds >= limit]

    @property
    def audited_requests(self) -> int:
        return sum(1 for o in self.outcomes if o.audited and o.reached_app)

    def routes(self) -> Counter[str]:
        return Counter(o.case.route for o in self.outcomes)

    def summary(self) -> str:
        seconds = [o.seconds for o in self.outcomes] or [0.0]
        slowest = max(self.outcomes, key=lambda o: o.seconds) if self.outcomes else None
        statuses = Counter(o.status for o in self.outcomes)
        routes = self.routes()
        lines = [
            f"cases:            {len(self.outcomes)} ({routes['setup']} setup, {routes['junk']} junk "
            f"paths, the rest over {len(routes) - 2} routes)",
            f"5xx / no answer:  {len(self.server_errors)}",
            f"slow (>= {SLOW:g} s):   {len(self.slow())}",
            f"latency:          p50 {percentile(seconds, 50) * 1000:.1f} ms, p99 "
            f"{percentile(seconds, 99) * 1000:.1f} ms, slowest {max(seconds) * 1000:.0f} ms"
            + (f" ({slowest.case.method} {slowest.case.url[:120]})" if slowest else ""),
            "statuses:         " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())),
            f"not from the app: {sum(1 for o in self.outcomes if not o.reached_app)} (refused by the server)",
            f"audit records:    {self.audit_records} written, {self.audited_requests} audited requests",
            f"server alive:     {'yes' if self.alive else 'NO'} {self.alive_detail}",
        ]
        return "\n".join(lines)

    def problems(self) -> list[Outcome]:
        """The answers that break an invariant: 5xx, none, or too slow."""
        return [o for o in self.outcomes if o.status >= 500 or o.status == 0 or o.seconds >= SLOW]

    def failures(self, limit: int = 20) -> str:
        found = self.problems()
        return "\n".join(
            f"{o.status or o.error} in {o.seconds:.2f} s: {o.text[:300]!r}\n{o.case.describe()}"
            for o in found[:limit]
        )


async def run_cases(
    transport: httpx.AsyncBaseTransport,
    base_url: str,
    generator: Generator,
    count: int,
    in_process: bool,
    deadline: float = 30.0,
    keep: bool = True,
) -> list[Outcome]:
    """Send the setup requests then ``count`` cases, one at a time, through ``transport`` (a
    client would parse redirects, and fail on a Location too long for it). ``in_process``: every
    answer came from the application (no HTTP server in between). ``keep``: every request whole;
    else only those of the answers that break an invariant (100,000 whole take gigabytes)."""
    outcomes = []
    timeout = {"timeout": httpx.Timeout(deadline).as_dict()}
    for case in [*generator.setup(), *(generator.case() for _ in range(count))]:
        headers = [(k.encode(), v.encode("latin-1", "replace")) for k, v in case.headers.items()]
        request = httpx.Request(case.method, base_url + case.url, headers=headers, content=case.body)
        request.extensions.update(timeout)
        path = unquote(request.url.raw_path.split(b"?", 1)[0].decode("ascii"))
        rule = audited(case.method, path, case.headers)
        start = time.perf_counter()
        try:
            response = await _send(transport, request, deadline)
        except (httpx.HTTPError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            outcomes.append(Outcome(case, 0, time.perf_counter() - start, rule, False, error))
            continue
        seconds = time.perf_counter() - start
        body = response.content
        generator.learn(case, response.status_code, response.headers, body)
        reached = in_process or "x-request-id" in response.headers
        text = body[:300].decode("utf-8", "replace")
        request_id = response.headers.get("x-request-id")
        if not keep and response.status_code < 500 and seconds < SLOW:
            case = Case(case.index, case.route, case.method, case.url[:200], {})
        outcomes.append(Outcome(case, response.status_code, seconds, rule, reached, None, text, request_id))
    return outcomes


async def _send(
    transport: httpx.AsyncBaseTransport, request: httpx.Request, deadline: float
) -> httpx.Response:
    """The answer, read whole. Once more on a new connection when the server had closed the
    kept-alive one (uvicorn does so after an application error, the previous case's 500)."""
    for attempt in (0, 1):
        try:
            with anyio.fail_after(deadline):
                response = await transport.handle_async_request(request)
                await response.aread()
            return response
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
            if attempt:
                raise
    raise AssertionError("unreachable")


async def still_serves(
    client: httpx.AsyncClient, site: Site, credentials: dict[str, str]
) -> tuple[bool, str]:
    """After the run: the health probe, a patient's search and one of her frames answer."""
    alice = {"Authorization": f"Bearer {credentials['alice']}"}
    study = site.studies["alice-1"]
    first = next(i for i in site.instances if i.study == study)
    frame = f"/dicom-web/studies/{study}/series/{first.series}/instances/{first.sop}/frames/1"
    checks = [("/health", {}), ("/dicom-web/studies", alice), (frame, alice)]
    for url, headers in checks:
        try:
            with anyio.fail_after(10):
                response = await client.get(url, headers=headers)
        except (httpx.HTTPError, TimeoutError) as exc:
            return False, f"{url}: {type(exc).__name__}"
        if response.status_code != 200:
            return False, f"{url}: {response.status_code} {response.text[:200]!r}"
    return True, "(/health, a patient's /studies and one of her frames: 200)"


# -- the command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from bench.report import machine_info
    from peers.process import free_port, stop, wait_http

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=OUT_DIR / "fuzz")
    parser.add_argument("--registry", help="registry URL (default: a SQLite file in the work dir)")
    args = parser.parse_args(argv)
    work, port = args.workdir.resolve(), free_port()
    for stale in ("registry.db", "data/access.db"):  # a fresh registry and audit log each run
        for suffix in ("", "-wal", "-shm"):
            Path(f"{work / stale}{suffix}").unlink(missing_ok=True)
    site = write_site(work, args.registry, port)
    specs, count = _route_table(site)  # before the server opens the same databases
    log_path = work / "gateway.log"
    log(f"gateway serve on 127.0.0.1:{port}, work dir {work}")
    with open(log_path, "wb") as out:
        serve = ["-m", "gateway", "serve", "--config", str(site.config), "--port", str(port)]
        process = subprocess.Popen([sys.executable, *serve], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    report = Report()
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process, "gateway serve", str(log_path))
        credentials = site.credentials()
        _wait_harvested(port, site, credentials)
        before = _settled(count)

        async def fuzz() -> None:
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1)) as transport:
                log(f"{args.cases} cases, seed {args.seed}")
                generator = Generator(args.seed, specs, site, credentials)
                report.outcomes = await run_cases(transport, base, generator, args.cases, False, keep=False)
            report.audit_records = _settled(count) - before
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                report.alive, report.alive_detail = await still_serves(client, site, credentials)

        anyio.run(fuzz)
        report.alive = report.alive and process.poll() is None
    finally:
        stop(process)
    machine = machine_info()
    print(report.summary())
    print(f"machine:          {machine['nproc']} cores ({machine['cpu_model']}), Python {machine['python']}")
    tracebacks = log_path.read_text(errors="replace").count("Traceback")
    print(f"server log:       {tracebacks} tracebacks ({log_path})")
    failures = report.problems()
    if failures:
        found = [
            vars(o.case) | {"status": o.status, "seconds": o.seconds, "error": o.error} for o in failures
        ]
        (work / "failures.json").write_text(json.dumps(found, default=str, indent=1))
        print(f"\nfailures (all of them in {work / 'failures.json'}):\n{report.failures()}")
    ok = not failures and report.alive and report.audit_records == report.audited_requests
    return 0 if ok else 1


def _route_table(site: Site) -> tuple[list[RouteSpec], Callable[[], int]]:
    """The application's routes, from an app built on the site's configuration (never served),
    and a function counting the audit records in its access database."""
    from gateway.access.control import Access
    from gateway.app import create_app
    from gateway.config import load_config
    from gateway.service import Gateway

    config = load_config(site.config, env={})
    gateway = Gateway(config)
    access = Access(config, gateway.registry)
    try:
        specs = route_specs(create_app(gateway, access=access).starlette.routes)  # type: ignore[attr-defined]
    finally:
        gateway.registry.close()
    return specs, access.store.audit_count


def _settled(count: Callable[[], int], quiet: float = 1.0, limit: float = 15.0) -> int:
    """The audit count once the server's writer (every 0.2 s) has stopped adding to it."""
    last, since, start = count(), time.monotonic(), time.monotonic()
    while time.monotonic() - start < limit and time.monotonic() - since < quiet:
        time.sleep(0.25)
        if (now := count()) != last:
            last, since = now, time.monotonic()
    return last


def _wait_harvested(port: int, site: Site, credentials: dict[str, str], limit: float = 60.0) -> None:
    """Until the start-up harvest has indexed every study of alice's."""
    headers = {"Authorization": f"Bearer {credentials['alice']}"}
    hers = len({i.study for i in site.instances if i.ins == ALICE})
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if len(httpx.get(f"http://127.0.0.1:{port}/dicom-web/studies", headers=headers).json()) >= hers:
                return
        time.sleep(0.5)
    raise SystemExit("the gateway did not index the site's studies in time")


if __name__ == "__main__":
    raise SystemExit(main())
