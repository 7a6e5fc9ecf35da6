"""The world a QIDO reference check runs over: a catalogue of what the sources' files say, a
registry written from it through the registry's own write API (``put_instances`` and
``remove_paths`` inside ``registry.transaction()``, with ``registry.ranks``), and beside it a model
of what that registry must then show, by the rules the registry documents
(``gateway/registry/arbitration.py``): a copy's metadata is written when its source holds the
instance alone or ranks better than every other holder; a copy that disagrees (another series) with
a better source's is a conflict, never a location; an instance goes with its last location, and
keeps the metadata last written while any location remains; a patient's row is the last record
written for them.
"""

from __future__ import annotations

import functools
import random
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.datadict import dictionary_VR, tag_for_keyword

from bench.synthetic import FAMILY, GIVEN, MODALITIES
from gateway.registry.record import record_from_json
from gateway.registry.store import Harvested

__all__ = ["World", "Writer", "build_world", "element", "fold", "tag", "vr", "SOURCES", "RANKS", "UID_ROOT"]

SOURCES = ("pacs", "site-b", "archive")  # by priority: the registry's ranks
RANKS = {name: rank for rank, name in enumerate(SOURCES)}
INS_OID = "1.2.250.1.213.1.4.8"  # an issuer of the INS (record.INS_ISSUERS)
UID_ROOT = "1.2.826.0.1.3680043.10.1234.9"
SITES = ("CHU-NANTES", "CLINIQUE-ATLANTIQUE", "CH-SAINT-NAZAIRE")


@functools.cache
def vr(keyword: str) -> str:
    return "CS" if keyword == "ModalitiesInStudy" else str(dictionary_VR(keyword))


@functools.cache
def tag(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


def fold(text: str) -> str:
    """What the README's case- and accent-insensitive name matching compares."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


# -- the catalogue: what the sources' files say -----------------------------------------------------


@dataclass
class Patient:
    key: tuple[str, str]  # (PatientID, IssuerOfPatientID): one row of the registry each
    versions: list[dict[str, Any]]  # the patient's attributes, one entry per rename
    ins: str | None


@dataclass
class Study:
    uid: str
    patient: Patient
    attrs: dict[str, Any]


@dataclass
class Series:
    uid: str
    study: Study
    attrs: dict[str, Any]


@dataclass
class Instance:
    uid: str
    series: Series  # where its files say it is now
    attrs: dict[str, Any]

    def copy_attrs(self, source: str) -> dict[str, Any]:
        """What ``source``'s copy says: copies differ in what does not identify the instance."""
        attrs = dict(self.attrs)
        attrs["ImageComments"] = f"copy held by {source}"
        time_of_day = attrs.get("ContentTime")
        if time_of_day and RANKS[source] and len(time_of_day) >= 6 and ":" not in time_of_day:
            seconds = (int(time_of_day[4:6]) + 7 * RANKS[source]) % 60
            attrs["ContentTime"] = f"{time_of_day[:4]}{seconds:02d}{time_of_day[6:]}"
        return attrs


@dataclass(frozen=True)
class Stored:
    """The metadata the registry holds for an instance: which write put it there."""

    series: Series
    source: str
    patient_version: int


class RegistryWriter(Protocol):
    ranks: dict[str, int]

    def transaction(self) -> Any: ...
    def put_instances(self, conn: Any, source: str, items: Sequence[Harvested]) -> Any: ...
    def remove_paths(self, conn: Any, source: str, paths: list[str]) -> None: ...
    def wrote(self, count: int) -> None: ...


# -- the world: the registry, and the model of what it must show ------------------------------------


@dataclass
class World:
    dialect: str
    patients: list[Patient] = field(default_factory=list)
    studies: list[Study] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    instances: dict[str, Instance] = field(default_factory=dict)
    locations: dict[tuple[str, str], str] = field(default_factory=dict)  # (source, path) -> SOP UID
    held: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # SOP UID -> its locations
    stored: dict[str, Stored] = field(default_factory=dict)
    patient_rows: dict[tuple[str, str], int] = field(default_factory=dict)  # last version written
    members: dict[str, set[str]] = field(default_factory=dict)  # series UID -> its stored instances
    operations: dict[str, int] = field(default_factory=dict)  # updates applied, by kind
    seconds: dict[str, float] = field(default_factory=dict)
    view: Any = None  # what it must show (``matching.view_of``), until the next write

    # The model's side of the two write calls (the registry's side is in ``Writer``).

    def put(self, source: str, items: list[tuple[str, str]]) -> None:
        """``put_instances(source, items)``: each path now holds that instance, as ``source`` says it."""
        for path, _ in items:
            self.drop(source, path)  # what a path held before goes first
        for path, uid in items:
            instance = self.instances[uid]
            others = {s for s, _ in self.held.get(uid, ()) if s != source}
            if others:
                best = min(RANKS[s] for s in others)
                if self.stored[uid].series is not instance.series:  # another identity: a conflict
                    if RANKS[source] >= best:
                        continue  # this copy is the conflict: not a location
                    for location in [loc for loc in self.held[uid] if loc[0] != source]:
                        self.drop(*location)  # theirs are
                elif RANKS[source] >= best:
                    self._locate(source, path, uid)  # one more place to read it from
                    continue
            version = len(instance.series.study.patient.versions) - 1
            if uid in self.stored:
                self.members[self.stored[uid].series.uid].discard(uid)
            self.stored[uid] = Stored(instance.series, source, version)
            self.members.setdefault(instance.series.uid, set()).add(uid)
            self.patient_rows[instance.series.study.patient.key] = version
            self._locate(source, path, uid)
        self.view = None

    def drop(self, source: str, path: str) -> None:
        """``remove_paths(source, [path])``."""
        uid = self.locations.pop((source, path), None)
        if uid is None:
            return
        held = self.held[uid]
        held.discard((source, path))
        if not held:
            self.members[self.stored[uid].series.uid].discard(uid)
            del self.held[uid], self.stored[uid]
        self.view = None

    def _locate(self, source: str, path: str, uid: str) -> None:
        self.locations[(source, path)] = uid
        self.held.setdefault(uid, set()).add((source, path))

    def body(self, uid: str, source: str, series: Series | None = None, version: int | None = None) -> dict:
        """The DICOM JSON of ``source``'s copy of an instance (as harvest would have read it)."""
        instance = self.instances[uid]
        series = series or instance.series
        patient = series.study.patient
        attrs = {
            **patient.versions[-1 if version is None else version],
            **series.study.attrs,
            **series.attrs,
            **instance.copy_attrs(source),
            "StudyInstanceUID": series.study.uid,
            "SeriesInstanceUID": series.uid,
            "SOPInstanceUID": uid,
        }
        out = {tag(k): element(k, v) for k, v in attrs.items() if v is not None}
        out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
        if patient.ins:
            out["00101002"] = {
                "vr": "SQ",
                "Value": [
                    {"00100020": element("PatientID", patient.ins), "00100021": element("PatientID", INS_OID)}
                ],
            }
        return out

    def stored_body(self, uid: str) -> dict:
        stored = self.stored[uid]
        return self.body(uid, stored.source, stored.series, stored.patient_version)


class Writer:
    """Applies each write to the registry (its own API) and to the model, in the same order. After
    each transaction, ``wrote`` as harvest calls it: the statistics are refreshed as the registry
    grows (without them PostgreSQL planned arbitration's lookups as scans of every location)."""

    def __init__(self, world: World, registry: RegistryWriter | None) -> None:
        self.world = world
        self.registry = registry
        self._conn: Any = None
        self._written = 0

    def transaction(self) -> Any:
        writer = self

        class _Transaction:
            def __enter__(self) -> Writer:
                if writer.registry is not None:
                    self.inner = writer.registry.transaction()
                    writer._conn = self.inner.__enter__()
                return writer

            def __exit__(self, *exc: Any) -> Any:
                writer._conn = None
                if writer.registry is None:
                    return None
                suppressed = self.inner.__exit__(*exc)
                if exc[0] is None:
                    writer.registry.wrote(writer._written)
                writer._written = 0
                return suppressed

        return _Transaction()

    def put(self, source: str, items: list[tuple[str, str]]) -> None:
        if self.registry is not None:
            harvested = [
                Harvested(path, 1000 + i, 1, record_from_json(self.world.body(uid, source)))
                for i, (path, uid) in enumerate(items)
            ]
            self.registry.put_instances(self._conn, source, harvested)
            self._written += len(items)
        self.world.put(source, items)

    def remove(self, source: str, paths: list[str]) -> None:
        if self.registry is not None:
            self.registry.remove_paths(self._conn, source, paths)
        for path in paths:
            self.world.drop(source, path)


def element(keyword: str, value: Any) -> dict[str, Any]:
    """A value as DICOM JSON (PS3.18 F.2): person names by component group, integers as numbers."""
    kind = vr(keyword)
    if value is None:
        return {"vr": kind}
    if kind == "PN":
        groups = value.split("=")
        name = {k: g for k, g in zip(("Alphabetic", "Ideographic", "Phonetic"), groups) if g}
        return {"vr": kind, "Value": [name]}
    return {"vr": kind, "Value": [value]}


# -- generation -----------------------------------------------------------------------------------------


_IDEOGRAPHIC = ("山田^太郎", "鈴木^花子", "佐藤^一郎")
_DESCRIPTIONS = (
    "TDM THORAX", "IRM CÉRÉBRALE", "Écho abdo [urgence]", "RADIO 100%_face", "ctrl*post-op", "IRM genou?",
    "Scanner corps entier", "irm cérébrale",
)  # fmt: skip
_TIMES = (
    "{h:02d}",
    "{h:02d}{m:02d}",
    "{h:02d}{m:02d}{s:02d}",
    "{h:02d}{m:02d}{s:02d}.{f}",
    "{h:02d}:{m:02d}:{s:02d}",
)


def _time(rng: random.Random, absent: float = 0.03) -> str | None:
    if rng.random() < absent:
        return None
    form = rng.choices(_TIMES, (1, 2, 12, 3, 1))[0]
    fraction = str(rng.randrange(10**6)).zfill(6)[: rng.randint(1, 6)]
    return form.format(h=rng.randint(0, 23), m=rng.randint(0, 59), s=rng.randint(0, 59), f=fraction)


def _date(rng: random.Random, absent: float = 0.02) -> str | None:
    if rng.random() < absent:
        return None
    return f"{rng.randint(2015, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"


def _maybe(rng: random.Random, value: Any, absent: float) -> Any:
    return None if rng.random() < absent else value


class _Generator:
    def __init__(self, world: World, rng: random.Random) -> None:
        self.world, self.rng = world, rng
        self.number = 0
        self.paths = 0
        self.created: list[str] = []  # every instance made, to draw from

    def uid(self) -> str:
        self.number += 1
        return f"{UID_ROOT}.{self.rng.randrange(1, 10**6)}.{self.number}"

    def path(self, source: str) -> str:
        self.paths += 1
        return f"{source}/{self.paths % 97:02d}/{self.paths}.dcm"

    def name(self) -> str | None:
        rng = self.rng
        if rng.random() < 0.02:
            return None
        sex = rng.choice("MF")
        given = rng.choice(GIVEN[sex]) + (f" {rng.choice(GIVEN[sex])}" if rng.random() < 0.1 else "")
        name = f"{rng.choice(FAMILY)}^{given}"
        if rng.random() < 0.5:  # legacy systems: upper case without accents
            name = fold(name).upper()
        if rng.random() < 0.05:
            name += "=" + rng.choice(_IDEOGRAPHIC)
        return name

    def patient(self) -> list[Patient]:
        rng, n = self.rng, len(self.world.patients)
        site = rng.choice(SITES + ("",))
        ins = (
            f"{rng.choice('12')}{rng.randrange(10**12):012d}{rng.randrange(100):02d}"
            if rng.random() < 0.3
            else None
        )
        attrs = {
            "PatientID": f"P{n // 10:05d}{n % 10}",  # ten patients share each prefix
            "IssuerOfPatientID": site or None,
            "PatientName": self.name(),
            "PatientBirthDate": _maybe(
                rng, f"{rng.randint(1930, 2014)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}", 0.05
            ),
            "PatientSex": _maybe(rng, rng.choice("MFO"), 0.05),
        }
        if ins and rng.random() < 0.2:  # a site that files patients by their INS
            attrs["PatientID"], attrs["IssuerOfPatientID"] = ins, INS_OID
        made = [Patient((attrs["PatientID"], attrs["IssuerOfPatientID"] or ""), [attrs], ins)]
        if ins and rng.random() < 0.15:  # the same person at another site, under the same INS
            twin = dict(attrs, PatientID=f"T{n:07d}", IssuerOfPatientID=rng.choice(SITES))
            made.append(Patient((twin["PatientID"], twin["IssuerOfPatientID"]), [twin], ins))
        self.world.patients += made
        return made

    def study(self, patient: Patient) -> Study:
        rng = self.rng
        referring = self.name()
        attrs = {
            "StudyDate": _date(rng),
            "StudyTime": _time(rng),
            "AccessionNumber": _maybe(rng, f"A{rng.randrange(10**6):06d}", 0.05),
            "StudyID": _maybe(rng, str(rng.randrange(1000)), 0.05),
            "ReferringPhysicianName": referring,
            "StudyDescription": _maybe(rng, rng.choice(_DESCRIPTIONS), 0.05),
            "TimezoneOffsetFromUTC": rng.choice((None, None, "+0100", "+0200", "-0500")),
            "InstitutionName": _maybe(rng, rng.choice(SITES), 0.1),
        }
        study = Study(self.uid(), patient, attrs)
        self.world.studies.append(study)
        return study

    def series(self, study: Study, modality: str | None = None) -> Series:
        rng = self.rng
        modality = modality or rng.choice(list(MODALITIES))
        attrs = {
            "Modality": _maybe(rng, modality, 0.02),
            "SeriesNumber": _maybe(rng, rng.randint(1, 12), 0.05),
            "SeriesDescription": _maybe(
                rng, f"{modality} {rng.choice(('axial', 'sag', 'Lat [G]', 'T1_FLAIR 50%'))}", 0.05
            ),
            "SeriesDate": _date(rng, 0.1),
            "SeriesTime": _time(rng, 0.1),
            "BodyPartExamined": _maybe(rng, rng.choice(("CHEST", "HEAD", "KNEE", "ABDOMEN")), 0.1),
            "PerformedProcedureStepStartDate": _date(rng, 0.3),
            "PerformedProcedureStepStartTime": _time(rng, 0.3),
            "ProtocolName": _maybe(rng, f"{modality}_{rng.randrange(5)}", 0.2),
        }
        series = Series(self.uid(), study, attrs)
        self.world.series.append(series)
        return series

    def instance(self, series: Series) -> Instance:
        rng = self.rng
        modality = series.attrs["Modality"] or "CT"
        sop_class, rows, columns = MODALITIES[modality][1:4]
        attrs = {
            "SOPClassUID": sop_class,
            "InstanceNumber": _maybe(rng, rng.randint(1, 40), 0.04),
            "Rows": rows,
            "Columns": columns,
            "BitsAllocated": 8 if modality == "US" else 16,
            "NumberOfFrames": rng.choice((None, None, None, 1, rng.randint(2, 60))),
            "ContentDate": _date(rng, 0.05),
            "ContentTime": _time(rng, 0.05),
        }
        instance = Instance(self.uid(), series, attrs)
        self.world.instances[instance.uid] = instance
        self.created.append(instance.uid)
        return instance


def build_world(
    registry: RegistryWriter | None, size: int, seed: int, dialect: str, updates: float = 0.15
) -> World:
    """``size`` instances written through the registry's API, then about ``updates * size``
    updates; ``registry`` None builds the model alone. ``dialect`` decides where absent values sort
    (SQLite: first in ascending order; PostgreSQL: last), as the databases do."""
    rng = random.Random(seed)
    world = World(dialect)
    if registry is not None:
        registry.ranks = dict(RANKS)
    make = _Generator(world, rng)
    writer = Writer(world, registry)
    started = time.perf_counter()
    # Initial harvests: each instance at one source, some at a second; batches per source.
    pending: dict[str, list[tuple[str, str]]] = {s: [] for s in SOURCES}
    count = 0
    while count < size:
        for patient in make.patient():
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                study = make.study(patient)
                for _ in range(rng.choice((1, 1, 2, 3, 4))):
                    series = make.series(study)
                    for _ in range(min(size - count, rng.choice((1, 2, 3, 5, 8, 20)))):
                        instance = make.instance(series)
                        count += 1
                        homes = rng.sample(SOURCES, 2 if rng.random() < 0.15 else 1)
                        for source in homes:
                            pending[source].append((make.path(source), instance.uid))
    for source, items in pending.items():
        for start in range(0, len(items), 500):
            with writer.transaction():  # a transaction per batch, as harvest commits them
                writer.put(source, items[start : start + 500])
    world.seconds["initial"] = time.perf_counter() - started
    started = time.perf_counter()
    _update(world, writer, make, rng, int(size * updates))
    world.seconds["updates"] = time.perf_counter() - started
    return world


def _update(world: World, writer: Writer, make: _Generator, rng: random.Random, count: int) -> None:
    """Random updates, 100 to a transaction, each applied to the registry and the model alike."""
    kinds: dict[str, Callable[[], None]] = {}

    def held_uid() -> str:
        while True:  # most instances ever made are held: a few draws
            uid = rng.choice(make.created)
            if uid in world.held:
                return uid

    def rewrite(uid: str) -> None:
        """Every source holding the instance harvests its changed file: by priority, mostly."""
        locations = sorted(world.held.get(uid, ()), key=lambda loc: RANKS[loc[0]])
        if rng.random() < 0.2:
            rng.shuffle(locations)  # a low-priority folder harvested before the PACS
        for source, path in locations:
            writer.put(source, [(path, uid)])

    def move_to_existing_series() -> None:  # the series may be another study's, of another patient
        uid = held_uid()
        world.instances[uid].series = rng.choice(world.series)
        rewrite(uid)

    def move_to_new_series() -> None:
        uid = held_uid()
        study = rng.choice(world.studies)
        if rng.random() < 0.3:
            study = make.study(rng.choice(world.patients))
        world.instances[uid].series = make.series(study)
        rewrite(uid)

    def move_between_sources() -> None:
        uid = held_uid()
        source, path = rng.choice(sorted(world.held[uid]))
        targets = [s for s in SOURCES if s not in {loc[0] for loc in world.held[uid]}]
        if not targets:
            return
        target = rng.choice(targets)
        steps = [
            lambda: writer.remove(source, [path]),
            lambda: writer.put(target, [(make.path(target), uid)]),
        ]
        if rng.random() < 0.5:
            steps.reverse()
        for step in steps:
            step()

    def copy_to_another_source() -> None:
        uid = held_uid()
        targets = [s for s in SOURCES if s not in {loc[0] for loc in world.held[uid]}]
        if targets:
            target = rng.choice(targets)
            writer.put(target, [(make.path(target), uid)])

    def remove_a_copy() -> None:
        uid = held_uid()
        source, path = rng.choice(sorted(world.held[uid]))
        writer.remove(source, [path])

    def remove_a_series() -> None:
        series = rng.choice(world.series)
        by_source: dict[str, list[str]] = {}
        for uid in sorted(world.members.get(series.uid, ())):
            for source, path in sorted(world.held[uid]):
                by_source.setdefault(source, []).append(path)
        for source, paths in by_source.items():
            writer.remove(source, paths)

    def reuse_a_path() -> None:  # a file now holds another (new) instance
        source, path = rng.choice(sorted(world.held[held_uid()]))
        writer.put(source, [(path, make.instance(rng.choice(world.series)).uid)])

    def rename_a_patient() -> None:
        patient = rng.choice(world.patients)
        renamed = dict(patient.versions[-1], PatientName=make.name())
        patient.versions.append(renamed)
        for series in [s for s in world.series if s.study.patient is patient]:
            for uid in sorted(world.members.get(series.uid, ())):
                rewrite(uid)

    kinds = {
        "move to another series": move_to_existing_series,
        "move to a new series": move_to_new_series,
        "move between sources": move_between_sources,
        "copy to another source": copy_to_another_source,
        "remove a copy": remove_a_copy,
        "remove a series": remove_a_series,
        "reuse a path": reuse_a_path,
        "rename a patient": rename_a_patient,
    }
    weights = (25, 10, 15, 10, 20, 2, 8, 3)
    done = 0
    while done < count:
        with writer.transaction():
            for _ in range(min(100, count - done)):
                kind = rng.choices(list(kinds), weights)[0]
                kinds[kind]()
                world.operations[kind] = world.operations.get(kind, 0) + 1
                done += 1
