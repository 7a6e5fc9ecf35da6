"""A synthetic registry of N instances for the scale benchmark (``bench/scale.py``), written
through the registry's own write API (``Registry.transaction()``, ``put_instances`` and
``wrote``, as harvest calls them; InstanceRecords built by ``record_from_json`` from DICOM JSON),
not by SQL of our own: the schema stays the registry's business, and ``generate`` takes any
object with those methods, SQLite or PostgreSQL. 7,500-8,300 instances/s on one core into SQLite
(1,000,000 in about 2 minutes, 4.6 GB); 4,300-5,200/s into PostgreSQL (4 minutes, 2.0 GB).

Shape (see ``_study_plan``): one patient per 50 instances (20,000 at 1,000,000), at one of three
sites (PatientID with IssuerOfPatientID); 30% with an INS (OtherPatientIDsSequence), a tenth of
those also registered at a second site under the same INS. Common French family and given names,
half with accents and half in legacy upper-case ASCII. Studies dated over 10 years (2015-2024):
CR and DX (1-2 single images), US (1-30 images), CT (a scout and 1-2 volumes of 1 to 300
slices), MR (2-5 series of 5 to 150 images); each instance carries a ~3 KB DICOM JSON header,
like a harvested one. Registries are cached by size and seed (SQLite files, or PostgreSQL schemas).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from bench.common import log
from bench.servers import fresh_registry
from gateway.registry.record import InstanceRecord, fold_text, record_from_json
from gateway.registry.store import Harvested, Registry
from gateway.types import PixelInfo

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

    def put_instances(self, conn: Any, source: str, items: Sequence[Harvested]) -> None: ...
    def wrote(self, count: int) -> None: ...


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
            items = [
                Harvested(path, length, MTIME_NS, record, pixel) for path, record, pixel, length in pending
            ]
            registry.put_instances(conn, SOURCE, items)
        registry.wrote(len(items))  # as harvest does: statistics refreshed as the registry grows
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
