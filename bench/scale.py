#!/usr/bin/env python3
"""QIDO latency with a large registry: 100,000 and 1,000,000 instances by default.

Run from the repository root with the project's venv::

    .venv/bin/python bench/scale.py                        # 100,000 and 1,000,000 instances
    .venv/bin/python bench/scale.py --sizes 100000 --requests 50

For each size, a registry of synthetic instances is generated (or reused from bench/out/scale/,
keyed by size and seed), served by ``gateway serve --no-harvest`` (open access, no sources), and
each kind of QIDO request below is timed through the real HTTP stack: sequential requests from one
httpx client, the kinds interleaved, each request with its own random values drawn from the
registry (patients, 3-month windows, name prefixes, studies) so that no cache flatters a figure.
The modality kinds are the exception: their value is the fixed ``MR`` the issue names. Each kind's
SQL is also timed in-process on the same values (the SQL `gateway.registry.qido` compiles), which
splits database time from HTTP and JSON time. A kind that has spent ``--budget`` seconds (60)
stops early: a query taking tens of seconds must not hold the run for hours. Prints one table
(target: p95 <= 20 ms at 1,000,000 instances) with the SQLite query plans of the kinds that miss
it; writes everything, raw latencies included, to bench/out/scale.json.

The registry is written through its own write API (``Registry.transaction()`` and
``put_instance``, one InstanceRecord built by ``record_from_json`` from DICOM JSON per instance),
not by SQL of our own: the schema stays the registry's business, and ``generate`` takes any object
with those two methods, so a PostgreSQL registry (a future ``--registry-url postgresql://...``)
needs no change here but opening it (``open_registry``). It is fast enough: ~10,000 instances/s
on one core, 1,000,000 in under 2 minutes (4.6 GB).

Shape (see ``_study_plan``): one patient per 50 instances (20,000 at 1,000,000), at one of three
sites (PatientID with IssuerOfPatientID); 30% with an INS (OtherPatientIDsSequence), a tenth of
those also registered at a second site under the same INS. Common French family and given names,
half with accents and half in legacy upper-case ASCII. Studies dated over 10 years (2015-2024):
CR and DX (1-2 single images), US (1-30 images), CT (a scout and 1-2 volumes of 1 to 300
slices), MR (2-5 series of 5 to 150 images); each instance carries a ~3 KB DICOM JSON header,
like a harvested one.
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

# `bench` is not an installed package: make it importable when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from urllib.parse import quote

import httpx
import orjson

from bench.common import JSON_ACCEPT, OUT_DIR, BenchError, log, percentile
from bench.report import machine_info, verdict
from bench.servers import fresh_registry, gateway_server, log_problems
from bench.study import warm_page_cache
from gateway.registry.qido import compile_query, parse_qido
from gateway.registry.record import InstanceRecord, fold_text, record_from_json
from gateway.registry.store import Registry
from gateway.stream.dicomfile import PixelInfo

TARGET_P95_MS = 20.0
TARGET_SIZE = 1_000_000  # the target applies from this registry size on
GENERATOR_VERSION = 1  # bump when the generated shape changes: cached registries are then rebuilt
INSTANCES_PER_PATIENT = 50
SOURCE = "archive"  # the location's source; the serving gateway has none configured, QIDO needs none
INS_OID = "1.2.250.1.213.1.4.8"  # an issuer in record.INS_ISSUERS (the numbers are random, not NIRs)
UID_ROOT = "1.2.826.0.1.3680043.10.1234.7"
SITES = ("CHU-NANTES", "CLINIQUE-ATLANTIQUE", "CH-SAINT-NAZAIRE")
FIRST_DAY = dt.date(2015, 1, 1).toordinal()  # studies are dated over the 10 years from it
DAYS = dt.date(2025, 1, 1).toordinal() - FIRST_DAY
SYNTAX = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian: frames are plain byte ranges
MTIME_NS = 1_700_000_000 * 10**9  # one file time for all: nothing here is ever harvested again
SQL_SAMPLES = 20  # requests of each kind whose SQL is also timed in-process

# Common French family names, most frequent first (weights follow the rank); "_" stands for a
# space inside a name.
FAMILY = (
    (
        "MARTIN BERNARD THOMAS PETIT ROBERT RICHARD DURAND DUBOIS MOREAU LAURENT SIMON MICHEL LEFÈVRE "
        "LEROY ROUX DAVID BERTRAND MOREL FOURNIER GIRARD BONNET DUPONT LAMBERT FONTAINE ROUSSEAU "
        "VINCENT MÜLLER FRANÇOIS MARTINEZ LEGRAND GARNIER FAURE ROUSSEL BLANC GUÉRIN HENRY PERRIN "
        "MORIN MATHIEU CLÉMENT GAUTHIER DUMONT LOPEZ CHEVALIER ROBIN MASSON SANCHEZ GÉRARD NGUYEN BOYER "
        "DENIS LEMAIRE DUVAL JOLY ROGER ROCHE NOËL MEYER LUCAS MEUNIER PÉREZ MARCHAND DUFOUR BLANCHARD "
        "BARBIER BRUN DUMAS BRUNET SCHMITT LEROUX COLIN FERNANDEZ RENARD ARNAUD CARON AUBERT GIRAUD "
        "LECLERC VIDAL BOURGEOIS RENAUD LEMOINE PICARD GAILLARD LACROIX FABRE DUPUIS OLIVIER HUBERT "
        "RIVIÈRE LE_GALL BERGER LECOMTE MÉNARD FLEURY DESCHAMPS CARPENTIER BENOÎT MAILLARD MARCHAL "
        "PRÉVOST POIRIER CHARPENTIER HUET LEBRUN DUPRÉ MARTEL MARTINET"
    )
    .replace("_", " ")
    .split()
)
GIVEN = {
    "M": "Jean Pierre Michel André Philippe Louis Alain Jacques Bernard Daniel Nicolas François "
    "Patrick Gérard Christophe Julien Éric Frédéric Stéphane Jérôme Sébastien Cédric Loïc Maël "
    "Noël Léon Mathéo Clément Hervé Benoît Raphaël Gaël Joël Grégory Théo Hugo Lucas".split(),
    "F": "Marie Hélène Françoise Monique Catherine Nathalie Isabelle Anne Sylvie Martine Nicole "
    "Christine Louise Chloé Léa Zoé Inès Maëlle Noémie Céline Amélie Agnès Gaëlle Anaïs Océane "
    "Thérèse Geneviève Béatrice Valérie Aurélie Émilie Élodie Manon Camille".split(),
}
# modality: (weight among studies, SOP Class UID, rows, columns, ((description, body part), ...))
MODALITIES = {
    "CR": (40, "1.2.840.10008.5.1.4.1.1.1", 2500, 2048, (("RADIO THORAX", "CHEST"),)),
    "DX": (20, "1.2.840.10008.5.1.4.1.1.1.1", 3000, 2500, (("RADIO GENOU", "KNEE"),)),
    "US": (15, "1.2.840.10008.5.1.4.1.1.6.1", 600, 800, (("ÉCHOGRAPHIE ABDOMINALE", "ABDOMEN"),)),
    "CT": (15, "1.2.840.10008.5.1.4.1.1.2", 512, 512, (("TDM THORAX", "CHEST"), ("TDM CÉRÉBRALE", "HEAD"))),
    "MR": (10, "1.2.840.10008.5.1.4.1.1.4", 384, 384, (("IRM CÉRÉBRALE", "BRAIN"), ("IRM GENOU", "KNEE"))),
}


# -- generation ---------------------------------------------------------------------------------


class RegistryWriter(Protocol):
    """What ``generate`` needs of a registry: its own write API, whatever the backend."""

    def transaction(self) -> AbstractContextManager[Any]: ...

    def put_instance(
        self,
        conn: Any,
        source: str,
        path: str,
        size: int,
        mtime_ns: int,
        record: InstanceRecord,
        pixel: PixelInfo | None,
    ) -> None: ...


@dataclass
class Shape:
    """What was generated (counted by the generator, so any backend reports the same)."""

    instances: int = 0
    series: int = 0
    studies: int = 0
    patients: int = 0
    seconds: float = 0.0
    modalities: dict[str, int] = field(default_factory=dict)  # studies per modality


def _e(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


def _pn(name: str) -> dict[str, Any]:
    return {"vr": "PN", "Value": [{"Alphabetic": name}]}


def _patients(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Patient-module DICOM JSON, one per registration (an INS twin at a second site is one more)."""
    weights = [1 / (rank + 4) for rank in range(len(FAMILY))]
    out: list[dict[str, Any]] = []
    for i in range(count):
        sex = rng.choice("MF")
        family = rng.choices(FAMILY, weights)[0]
        given = rng.choice(GIVEN[sex]) + (f"^{rng.choice(GIVEN[sex])}" if rng.random() < 0.2 else "")
        name = f"{family}^{given}"
        if rng.random() < 0.5:  # legacy systems: upper case without accents
            name = fold_text(name).upper()
        birth = f"{rng.randint(1930, 2014)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        site = rng.randrange(len(SITES))
        body = {
            "00100010": _pn(name),
            "00100020": _e("LO", f"{(i * 7919 + 104729) % 10**8:08d}"),  # unique: 7919 is prime to 10
            "00100021": _e("LO", SITES[site]),
            "00100030": _e("DA", birth),
            "00100040": _e("CS", sex),
        }
        out.append(body)
        if rng.random() < 0.3:
            nir = f"{1 if sex == 'M' else 2}{birth[2:4]}{birth[4:6]}{rng.randint(1, 95):02d}{i:06d}"
            ins = f"{nir}{97 - int(nir) % 97:02d}"
            body["00101002"] = {
                "vr": "SQ",
                "Value": [{"00100020": _e("LO", ins), "00100021": _e("LO", INS_OID)}],
            }
            if rng.random() < 0.1:  # the same person, known at another site by the same INS
                twin = dict(body)
                twin["00100020"] = _e("LO", f"T{i:07d}")
                twin["00100021"] = _e("LO", SITES[(site + 1) % len(SITES)])
                out.append(twin)
    return out


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    """Series lengths: many short series, few long ones (mean ~52 for 1..300)."""
    return int(math.exp(rng.uniform(math.log(low), math.log(high + 1))))


def _study_plan(rng: random.Random, modality: str) -> list[int]:
    """Instances per series for one study of ``modality`` (1 to 5 series)."""
    if modality == "CR":
        return [1] * rng.randint(1, 2)  # e.g. chest PA, and lateral
    if modality == "DX":
        return [rng.randint(1, 2) for _ in range(rng.randint(1, 2))]
    if modality == "US":
        return [rng.randint(1, 30)]
    if modality == "CT":  # scout, then volumes
        return [rng.randint(1, 2)] + [_log_uniform(rng, 1, 300) for _ in range(rng.randint(1, 2))]
    return [_log_uniform(rng, 5, 150) for _ in range(rng.randint(2, 5))]


def generate(registry: RegistryWriter, size: int, seed: int, batch: int = 5000) -> Shape:
    """Write ``size`` instances into ``registry`` through its write API, ``batch`` per transaction.

    Every patient gets one study first, then the remaining studies go to patients drawn with a
    skew (follow-up patients have many); the last series is cut so that the total is exact."""
    rng = random.Random(seed)
    patients = _patients(rng, max(1, size // INSTANCES_PER_PATIENT))
    modalities = list(MODALITIES)
    weights = [MODALITIES[m][0] for m in modalities]
    shape = Shape(modalities={m: 0 for m in modalities})
    used: set[int] = set()
    pending: list[tuple[str, InstanceRecord, PixelInfo, int]] = []
    start = time.perf_counter()
    report = 100_000

    def flush() -> None:
        with registry.transaction() as conn:
            for path, record, pixel, length in pending:
                registry.put_instance(conn, SOURCE, path, length, MTIME_NS, record, pixel)
        pending.clear()

    for number in itertools.count():
        if shape.instances >= size:
            break
        # Cubing a uniform draw skews it: a few patients (followed up) get many studies.
        who = number if number < len(patients) else int(len(patients) * rng.random() ** 3)
        used.add(who)
        modality = rng.choices(modalities, weights)[0]
        shape.studies += 1
        shape.modalities[modality] += 1
        study = _study_json(rng, seed, number, patients[who], modality)
        for series_number, count in enumerate(_study_plan(rng, modality), start=1):
            count = min(count, size - shape.instances)
            if count <= 0:
                break
            shape.series += 1
            series = _series_json(study, modality, series_number)
            rows, columns = MODALITIES[modality][2:4]
            length = rows * columns * (3 if modality == "US" else 2)
            # One frame map per series: every instance of it has the same pixel data length.
            pixel = PixelInfo(SYNTAX, "direct", False, "OW", 1500, length, {"native": [1500, length, 1]})
            series_uid = series["0020000E"]["Value"][0]
            folder = f"{series['00080080']['Value'][0]}/{number}/{series_number}"
            for instance_number in range(1, count + 1):
                body = dict(series)
                sop_uid = f"{series_uid}.{instance_number}"
                body["00080018"] = _e("UI", sop_uid)
                body["00200013"] = _e("IS", instance_number)
                body["00200032"] = _e("DS", -180.0, -180.0, -1.25 * instance_number)
                body["00201041"] = _e("DS", -1.25 * instance_number)
                # As harvest stores it: relative, completed with the base URL when served.
                body["7FE00010"] = {
                    "vr": "OW",
                    "BulkDataURI": f"/studies/{study['0020000D']['Value'][0]}/series/{series_uid}"
                    f"/instances/{sop_uid}/bulk/7FE00010",
                }
                path = f"{folder}/{instance_number:04d}.dcm"
                pending.append((path, record_from_json(body), pixel, 1500 + length))
            shape.instances += count
            if len(pending) >= batch:
                flush()
            if shape.instances >= report:
                rate = shape.instances / (time.perf_counter() - start)
                log(f"  {shape.instances:,} / {size:,} instances ({rate:,.0f}/s)")
                report += 100_000
    flush()
    shape.patients = len(used)
    shape.seconds = time.perf_counter() - start
    return shape


def _study_json(
    rng: random.Random, seed: int, number: int, patient: dict[str, Any], modality: str
) -> dict[str, Any]:
    description, body_part = rng.choice(MODALITIES[modality][4])
    date = dt.date.fromordinal(FIRST_DAY + rng.randrange(DAYS)).strftime("%Y%m%d")
    referrer = f"{rng.choice(FAMILY)}^{rng.choice(GIVEN[rng.choice('MF')])}"
    return {
        **patient,
        "00080005": _e("CS", "ISO_IR 192"),
        "00080020": _e("DA", date),
        "00080030": _e("TM", f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"),
        "00080050": _e("SH", f"A{seed}{number:08d}"),
        "00080080": _e("LO", SITES[number % len(SITES)]),
        "00080090": _pn(referrer),
        "00081030": _e("LO", description),
        "00180015": _e("CS", body_part),
        # Random digits before the study number: UIDs do not arrive in index order.
        "0020000D": _e("UI", f"{UID_ROOT}.{seed}.{rng.randrange(10**8, 10**9)}.{number}"),
        "00200010": _e("SH", str(number % 100_000)),
    }


def _series_json(study: dict[str, Any], modality: str, series_number: int) -> dict[str, Any]:
    """The elements every instance of a series shares: what a modality writes, ~3 KB of JSON."""
    _, sop_class, rows, columns, _ = MODALITIES[modality]
    series_uid = f"{study['0020000D']['Value'][0]}.{series_number}"
    date = study["00080020"]["Value"][0]
    color = modality == "US"
    volume = modality in ("CT", "MR")
    return {
        **study,
        "00020010": _e("UI", SYNTAX),
        "00080008": _e("CS", "ORIGINAL", "PRIMARY", "AXIAL" if volume else "OTHER"),
        "00080016": _e("UI", sop_class),
        "00080021": _e("DA", date),
        "00080022": _e("DA", date),
        "00080023": _e("DA", date),
        "00080031": study["00080030"],
        "00080033": study["00080030"],
        "00080060": _e("CS", modality),
        "00080070": _e("LO", "Synthetic Medical Systems"),
        "00081010": _e("SH", f"{modality}01"),
        "0008103E": _e("LO", f"{modality} {study['00180015']['Value'][0].lower()} {series_number}"),
        "00081090": _e("LO", "bench/scale.py"),
        "00180050": _e("DS", 1.25),
        "00181020": _e("LO", "VA48A"),
        "00185100": _e("CS", "HFS"),
        "0020000E": _e("UI", series_uid),
        "00200011": _e("IS", series_number),
        "00200037": _e("DS", 1, 0, 0, 0, 1, 0),
        "00200052": _e("UI", f"{series_uid}.0"),
        "00200060": _e("CS", "L"),
        "00201040": _e("LO", "SN"),
        "00280002": _e("US", 3 if color else 1),
        "00280004": _e("CS", "RGB" if color else "MONOCHROME2"),
        "00280010": _e("US", rows),
        "00280011": _e("US", columns),
        "00280030": _e("DS", 0.7, 0.7),
        "00280100": _e("US", 8 if color else 16),
        "00280101": _e("US", 8 if color else 12),
        "00280102": _e("US", 7 if color else 11),
        "00280103": _e("US", 0),
        "00281050": _e("DS", 40),
        "00281051": _e("DS", 400),
        "00281052": _e("DS", -1024 if modality == "CT" else 0),
        "00281053": _e("DS", 1),
    }


def open_registry(target: Path | str) -> Registry:
    """The one place that opens the registry under test: a SQLite file, or a PostgreSQL URL
    (``--registry-url``; one schema per size and seed)."""
    return Registry(target)


@dataclass
class Prepared:
    path: Path  # SQLite: the registry file; PostgreSQL: the marker file
    shape: Shape
    reused: bool
    url: str = ""  # PostgreSQL: the registry URL (its schema in search_path)

    @property
    def target(self) -> Path | str:
        return self.url or self.path

    @property
    def bytes(self) -> int:
        if not self.url:
            return self.path.stat().st_size
        registry = open_registry(self.url)
        try:
            return int(
                registry.query(
                    "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
                )[0][0]
            )
        finally:
            registry.close()


def postgres_schema(base_url: str, size: int, seed: int, fresh: bool) -> str:
    """The URL of this size's schema in the PostgreSQL database at ``base_url`` (emptied when
    ``fresh``)."""
    import psycopg

    schema = f"scale_{size}_seed{seed}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        if fresh:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    separator = "&" if "?" in base_url else "?"
    return f"{base_url}{separator}options={quote(f'-csearch_path={schema}')}"


def prepare_registry(
    workdir: Path, size: int, seed: int, regenerate: bool, base_url: str | None = None
) -> Prepared:
    """Generate a registry, or reuse the one cached in ``workdir`` for this size and seed. The
    marker is written last, so a registry whose generation was interrupted is never reused; a
    registry the current code has emptied on opening (another schema version) is generated again."""
    path = workdir / f"registry-{size}-seed{seed}.db"
    marker = path.with_suffix(".json")
    url = ""
    if base_url:
        path = workdir / f"postgresql-{size}-seed{seed}"
        marker = path.with_suffix(".json")
        url = postgres_schema(base_url, size, seed, fresh=False)
    if not regenerate and marker.is_file() and (url or path.is_file()):
        info = json.loads(marker.read_text())
        registry = open_registry(url or path)
        try:
            held = registry.counts()["instances"]
        finally:
            registry.close()
        if info.get("generator") == GENERATOR_VERSION and held == size:
            registry = open_registry(url or path)
            try:
                registry.analyze()  # as after a harvest (a registry cached before it did)
            finally:
                registry.close()
            return Prepared(path, Shape(**info["shape"]), True, url)
        log(f"cached registry {path.name} is stale ({held:,} instances held): generating again")
    marker.unlink(missing_ok=True)
    if url:
        url = postgres_schema(base_url or "", size, seed, fresh=True)
    else:
        fresh_registry(path)
    log(f"generating {size:,} instances into {url or path}")
    registry = open_registry(url or path)
    try:
        shape = generate(registry, size, seed)
        registry.analyze()  # as a harvest of that size does at its end
    finally:
        registry.close()  # the last connection: SQLite checkpoints and removes the WAL
    marker.write_text(json.dumps({"generator": GENERATOR_VERSION, "seed": seed, "shape": asdict(shape)}))
    return Prepared(path, shape, False, url)


# -- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One QIDO request: its level, matching keys and, for a study's series or instances, the
    study in the path."""

    level: str  # "study" | "series" | "instance"
    params: dict[str, str]
    study: str | None = None

    @property
    def url(self) -> str:
        if self.study is None:
            path = {"study": "studies", "series": "series", "instance": "instances"}[self.level]
        else:
            path = f"studies/{self.study}/{'series' if self.level == 'series' else 'instances'}"
        return f"/dicom-web/{path}"

    def sql(self, dialect: str = "sqlite") -> tuple[str, list[Any]]:
        """The SQL the gateway runs for this request (its QIDO compiler, no access restriction)."""
        scope = {"StudyInstanceUID": self.study} if self.study else {}
        sql, params, _ = compile_query(parse_qido(list(self.params.items()), self.level, scope), dialect)
        return sql, params


@dataclass
class Samples:
    """Values drawn from the registry itself, so that every request names something it holds."""

    patient_ids: list[str]
    ins: list[str]
    names: list[str]
    studies: list[str]

    @classmethod
    def of(cls, registry: Registry) -> Samples:
        patients = registry.query("SELECT PatientID, INS, PatientName FROM patients ORDER BY id")
        studies = registry.query("SELECT StudyInstanceUID FROM studies ORDER BY StudyInstanceUID")
        return cls(
            [p[0] for p in patients],
            [p[1] for p in patients if p[1]],
            [p[2] for p in patients],
            [s[0] for s in studies],
        )


def _window(rng: random.Random, _: Samples) -> Request:
    month = rng.randrange(12 * 10 - 2)  # the first of three months, within the 10 years
    first, last = divmod(month, 12), divmod(month + 2, 12)
    end = calendar.monthrange(2015 + last[0], last[1] + 1)[1]
    value = f"{2015 + first[0]}{first[1] + 1:02d}01-{2015 + last[0]}{last[1] + 1:02d}{end}"
    return Request("study", {"StudyDate": value})


def _wildcard(rng: random.Random, samples: Samples) -> Request:
    # What a user types: the first letters of a family name, upper case, no accents.
    family = rng.choice(samples.names).split("^")[0]
    return Request("study", {"PatientName": fold_text(family)[:4].upper() + "*"})


def _fuzzy(rng: random.Random, samples: Samples) -> Request:
    # One word, the start of a family or given name, as typed in a search box ("franc").
    component = rng.choice(rng.choice(samples.names).split("^")[:2])
    return Request("study", {"fuzzymatching": "true", "PatientName": fold_text(component)[:5]})


KINDS: dict[str, Callable[[random.Random, Samples], Request]] = {
    "study by PatientID": lambda rng, s: Request("study", {"PatientID": rng.choice(s.patient_ids)}),
    "study by INS (PatientID + INS issuer)": lambda rng, s: Request(
        "study", {"PatientID": rng.choice(s.ins), "IssuerOfPatientID": INS_OID}
    ),
    "study by StudyDate, 3-month window": _window,
    "study by ModalitiesInStudy=MR": lambda rng, s: Request("study", {"ModalitiesInStudy": "MR"}),
    "series by Modality=MR": lambda rng, s: Request("series", {"Modality": "MR"}),
    "study by PatientName=XXXX* (wildcard)": _wildcard,
    "study by PatientName, fuzzymatching": _fuzzy,
    "series of a study": lambda rng, s: Request("series", {}, rng.choice(s.studies)),
    "instances of a study": lambda rng, s: Request("instance", {}, rng.choice(s.studies)),
}
NON_EMPTY = set(KINDS) - {"study by StudyDate, 3-month window"}  # values come from the registry


# -- measurement ----------------------------------------------------------------------------------


@dataclass
class KindResult:
    latencies_ms: list[float] = field(default_factory=list)
    results: list[int] = field(default_factory=list)
    sql_ms: list[float] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    sql: str = ""
    example: str = ""

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


WARMUP = 2  # untimed requests of each kind first: imports, first-use caches, the page cache


def measure_size(
    workdir: Path, prepared: Prepared, requests: int, seed: int, budget: float, limit: int | None = None
) -> tuple[dict[str, KindResult], list[str]]:
    """Every kind, ``requests`` times (fewer when a kind uses up its ``budget`` seconds), through
    a gateway serving the registry; then each kind's SQL in-process, and its query plan."""
    size = prepared.shape.instances
    if not prepared.url:
        warm_page_cache([prepared.path])  # a reused registry: read from memory, as a served one is
    registry = open_registry(prepared.target)
    try:
        samples = Samples.of(registry)
        rng = random.Random(f"{seed}-{size}")
        planned = {
            kind: [make(rng, samples) for _ in range(WARMUP + requests)] for kind, make in KINDS.items()
        }
        if limit:  # a viewer's page (OHIF asks for limit=101) rather than the server's maximum
            for kind_requests in planned.values():
                for request in kind_requests:
                    request.params["limit"] = str(limit)
        config = workdir / f"gateway-{size}.toml"
        config.write_text(
            f'[server]\nhost = "127.0.0.1"\n[registry]\nurl = "{prepared.url or f"sqlite:///{prepared.path}"}"\n'
            "[auth]\nopen = true\n"  # no access restriction in the SQL; no [[sources]]: no harvest
        )
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        with gateway_server(config, logs, str(size)) as server:
            out = time_http(f"http://127.0.0.1:{server.port}", planned, budget)
        for kind, result in out.items():
            timed = planned[kind][WARMUP : WARMUP + len(result.latencies_ms)]
            result.sql_ms = time_sql(registry, timed[:SQL_SAMPLES], budget / 4)
            result.sql, params = timed[0].sql(registry.dialect)
            result.plan = query_plan(registry, result.sql, params)
    finally:
        registry.close()
    return out, log_problems(logs / f"gateway-serve-{size}.log")


def time_http(base_url: str, planned: dict[str, list[Request]], budget: float) -> dict[str, KindResult]:
    """One keep-alive client, sequential requests, the kinds interleaved so that none profits from
    running alone; a kind that has spent ``budget`` seconds stops (its cell says how many ran)."""
    out = {kind: KindResult(example=_example(requests[WARMUP])) for kind, requests in planned.items()}
    spent = dict.fromkeys(planned, 0.0)
    rounds = len(next(iter(planned.values())))
    with httpx.Client(base_url=base_url, headers={"Accept": JSON_ACCEPT}, timeout=600) as client:
        for i in range(rounds):
            if i and i % 50 == 0:
                log(f"  {i} / {rounds} rounds")
            for kind, result in out.items():
                if spent[kind] > budget:
                    continue
                request = planned[kind][i]
                start = time.perf_counter()
                response = client.get(request.url, params=request.params)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    raise BenchError(f"{_example(request)} -> {response.status_code}: {response.text[:200]}")
                found = len(orjson.loads(response.content))
                if found == 0 and kind in NON_EMPTY:
                    raise BenchError(f"{_example(request)}: no result")
                if i >= WARMUP:
                    spent[kind] += elapsed
                    result.latencies_ms.append(elapsed * 1000)
                    result.results.append(found)
    return out


def time_sql(registry: Registry, requests: list[Request], budget: float) -> list[float]:
    """The SQL of these requests run in-process, in ms: what the database costs, without HTTP and
    JSON. The first run is not timed (as over HTTP, it warms up)."""
    times: list[float] = []
    for i, request in enumerate(requests[:1] + requests):
        sql, params = request.sql(registry.dialect)
        start = time.perf_counter()
        registry.query(sql, params)
        if i:
            times.append((time.perf_counter() - start) * 1000)
        if sum(times) > budget * 1000:
            break
    return times


def _example(request: Request) -> str:
    return f"{request.url}?{httpx.QueryParams(request.params)}".rstrip("?")


def query_plan(registry: Registry, sql: str, params: list[Any]) -> list[str]:
    """The database's plan: EXPLAIN QUERY PLAN as SQLite's shell prints it (one line per step,
    indented under its parent), or PostgreSQL's EXPLAIN."""
    if registry.dialect == "postgresql":
        return [row[0] for row in registry.query("EXPLAIN " + sql, params)]
    rows = registry.query("EXPLAIN QUERY PLAN " + sql, params)
    depth: dict[int, int] = {0: -1}
    lines = []
    for node, parent, _, detail in rows:
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + str(detail))
    return lines


# -- report ---------------------------------------------------------------------------------------


@dataclass
class SizeRun:
    prepared: Prepared | None = None
    kinds: dict[str, KindResult] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    error: str = ""

    def json(self) -> dict[str, Any]:
        registry = None
        if self.prepared is not None:
            registry = {"path": str(self.prepared.path), "bytes": self.prepared.bytes}
            registry |= {"reused": self.prepared.reused, **asdict(self.prepared.shape)}
        kinds = {
            kind: {"p50_ms": k.p(50), "p95_ms": k.p(95), "p99_ms": k.p(99), **asdict(k)}
            for kind, k in self.kinds.items()
        }
        return {"error": self.error, "registry": registry, "kinds": kinds, "log": self.problems[:50]}


def table_rows(runs: dict[int, SizeRun], requests: int) -> tuple[list[tuple[str, ...]], list[str]]:
    """Rows (measurement, one cell per size, target, result) and the kinds that miss the target.

    Not bench/report.py's Table: its columns are one gateway and one Orthanc figure, here each
    size is a column, so that a kind reads across sizes on one line."""

    def row(
        label: str, text: Callable[[SizeRun], str], target: str = "-", result: str = "info"
    ) -> tuple[str, ...]:
        cells = ("ERROR" if r.error else text(r) if r.prepared is not None else "" for r in runs.values())
        return (label, *cells, target, result)

    def kind_text(r: SizeRun, *, kind: str) -> str:
        k = r.kinds.get(kind)
        if k is None:
            return "-"
        n = "" if len(k.latencies_ms) == requests else f"; n={len(k.latencies_ms)}"
        return (
            f"{k.p(50):.1f} / {k.p(95):.1f} / {k.p(99):.1f} ms; {sum(k.results) / len(k.results):,.0f} res; "
            f"SQL {percentile(k.sql_ms, 50):.2f}{n}"
        )

    def shape(r: SizeRun) -> Shape:
        assert r.prepared is not None
        return r.prepared.shape

    def size_text(r: SizeRun) -> str:
        assert r.prepared is not None
        return f"{r.prepared.bytes / 1e6:,.0f} MB ({r.prepared.bytes / shape(r).instances:,.0f} B/inst)"

    rows = [
        ("measurement", *(f"{size:,} instances" for size in runs), "target", "result"),
        row(
            "registry: patients / studies / series",
            lambda r: f"{shape(r).patients:,} / {shape(r).studies:,} / {shape(r).series:,}",
        ),
        row("registry file (SQLite)", size_text),
        row(
            "generation via Registry.put_instance",
            lambda r: (
                f"{shape(r).seconds:.0f} s ({shape(r).instances / shape(r).seconds:,.0f} inst/s"
                + (", reused)" if r.prepared and r.prepared.reused else ")")
            ),
            "few minutes",
        ),
    ]
    at_target = [size for size in runs if size >= TARGET_SIZE and runs[size].kinds]
    misses = [k for k in KINDS if any(runs[size].kinds[k].p(95) > TARGET_P95_MS for size in at_target)]
    for kind in KINDS:
        result = verdict(kind not in misses) if at_target else "info"
        rows.append(
            row(f"QIDO {kind}", partial(kind_text, kind=kind), f"p95 <= {TARGET_P95_MS:.0f} ms", result)
        )
    failed = any(r.problems or r.error for r in runs.values())
    rows.append(
        row("gateway log: ERROR lines / tracebacks", lambda r: str(len(r.problems)), "0", verdict(not failed))
    )
    return rows, misses


def render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def publish(
    runs: dict[int, SizeRun], machine: dict[str, Any], args: argparse.Namespace, elapsed: float
) -> None:
    """Print the machine line, the table, the plans of the misses and log problems; write the JSON."""
    rows, misses = table_rows(runs, args.requests)
    print(
        f"machine: nproc={machine['nproc']}, CPU {machine['cpu_model']}, Python {machine['python']}, "
        f"{machine['date']}; load average at start {machine['loadavg']}; run took {elapsed:.0f} s\n"
        f"QIDO cells: p50 / p95 / p99 over {args.requests} sequential HTTP requests; mean results "
        f"per request; SQL: p50 of the same SQL in-process (up to {SQL_SAMPLES} requests)"
    )
    print(render(rows))
    largest = max((size for size in runs if runs[size].kinds), default=0)
    for kind in misses:
        k = runs[largest].kinds[kind]
        print(f"\nMISS {kind} at {largest:,}: e.g. {k.example}\n  plan:\n    " + "\n    ".join(k.plan))
    for size, run in runs.items():
        for line in ([run.error] if run.error else []) + run.problems[:10]:
            print(f"{size:,} instances: {line}")
    out = OUT_DIR / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": machine,
        "elapsed_s": elapsed,
        "args": {k: str(v) for k, v in vars(args).items()},
        "target": {"p95_ms": TARGET_P95_MS, "from_instances": TARGET_SIZE},
        "table": rows,
        "sizes": {str(size): run.json() for size, run in runs.items()},
    }
    out.write_text(json.dumps(summary, indent=1))
    print(f"\nJSON: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="instances (100000 1000000)"
    )
    parser.add_argument("--requests", type=int, default=200, help="timed requests per kind and size (200)")
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds of timed requests per kind and size; a slower kind stops early (60)",
    )
    parser.add_argument("--seed", type=int, default=0, help="generation and request values (0)")
    parser.add_argument(
        "--regenerate", action="store_true", help="generate again even if a cached registry is there"
    )
    parser.add_argument(
        "--limit", type=int, help="QIDO limit on every request (a viewer's page: 101); default none"
    )
    parser.add_argument(
        "--registry-url",
        help="a PostgreSQL database (postgresql://...) instead of SQLite files: one schema per size",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=OUT_DIR / "scale",
        help="cached registries, gateway configs and logs (default bench/out/scale)",
    )
    args = parser.parse_args(argv)
    if min(*args.sizes, args.requests) < 1:
        parser.error("sizes and requests must be positive")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    machine["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.perf_counter()
    runs = {size: SizeRun() for size in sorted(set(args.sizes))}
    for size, run in runs.items():
        try:
            run.prepared = prepare_registry(workdir, size, args.seed, args.regenerate, args.registry_url)
            log(f"{size:,} instances: serving, {len(KINDS)} kinds x {args.requests} requests")
            run.kinds, run.problems = measure_size(
                workdir, run.prepared, args.requests, args.seed, args.budget, args.limit
            )
        except Exception as exc:  # noqa: BLE001 - reported in the table; the next size still runs
            log(f"!! {size:,} instances: {type(exc).__name__}: {exc}")
            run.error = f"{type(exc).__name__}: {exc}"[:300]
    publish(runs, machine, args, time.perf_counter() - started)
    return 1 if any(run.error for run in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
