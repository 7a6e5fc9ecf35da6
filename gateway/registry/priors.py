"""Relevant priors: which of a patient's other studies a reader wants beside the current one,
ranked by rules a PACS uses, each prior with the reasons it scored (pure: summaries in, ranking out;
the studies come from ``history.study_history``).

Candidates are the patient's other studies (across sources, joined by INS) dated on or before the
current study (all of them when either has no date). Each gets points:

    same modality      +4  a modality in common (CR and DX count as one, radiography); series
                           that are not images (SR, KO, PR, SEG, ...) do not count
    same body region   +3  a region in common; a study's regions come from its series'
                           BodyPartExamined, their AnatomicRegionSequence codes (SNOMED CT) and
                           the words of the study and series descriptions (English and French:
                           CHEST / THORAX / POUMON, HEAD / BRAIN / CRANE / CEREBRAL, ABDOMEN /
                           ABDO / FOIE, TAP = thorax-abdomen-pelvis, ...: ``KEYWORDS``)
    recent             +2  at most 1 year before the current study; +1 at most 5 years
    one of the last n  +1  among the ``last`` (2) most recent candidates: fetching the last
                           studies beat a time window in a published evaluation of prefetching

and they are ordered by score, then the most recent first. Every answer says why.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

from gateway.fhir.bodysite import term_of_code
from gateway.registry.history import StudySummary, study_history
from gateway.types import Restriction

if TYPE_CHECKING:
    from gateway.registry.store import Registry

__all__ = [
    "Reason",
    "Prior",
    "KEYWORDS",
    "BODY_PART_REGIONS",
    "POINTS",
    "regions_of",
    "modalities_of",
    "rank_priors",
    "best_priors",
    "CANDIDATES",
]

CANDIDATES = 500  # the patient's most recent studies ranked (a longer history: its newest 500)
POINTS = {"modality": 4, "region": 3, "recent": 2, "older": 1, "last": 1}
_RECENT_DAYS, _OLDER_DAYS = 366, 5 * 366

HEAD, NECK, CHEST, ABDOMEN, PELVIS = "HEAD", "NECK", "CHEST", "ABDOMEN", "PELVIS"
SPINE, BREAST, HEART, UPPER, LOWER = "SPINE", "BREAST", "HEART", "UPPER LIMB", "LOWER LIMB"
_ALL = (HEAD, NECK, CHEST, ABDOMEN, PELVIS, SPINE, BREAST, HEART, UPPER, LOWER)

# BodyPartExamined defined terms (PS3.16 Annex L) and the regions they cover.
BODY_PART_REGIONS: dict[str, tuple[str, ...]] = {
    "HEAD": (HEAD,), "BRAIN": (HEAD,), "SKULL": (HEAD,), "IAC": (HEAD,), "HEADNECK": (HEAD, NECK),
    "NECK": (NECK,), "CHEST": (CHEST,), "LUNG": (CHEST,), "CHESTABDOMEN": (CHEST, ABDOMEN),
    "CHESTABDPELVIS": (CHEST, ABDOMEN, PELVIS), "ABDOMEN": (ABDOMEN,), "LIVER": (ABDOMEN,),
    "KIDNEY": (ABDOMEN,), "PANCREAS": (ABDOMEN,), "ABDOMENPELVIS": (ABDOMEN, PELVIS),
    "PELVIS": (PELVIS,), "PROSTATE": (PELVIS,), "BLADDER": (PELVIS,), "SPINE": (SPINE,),
    "CSPINE": (SPINE,), "TSPINE": (SPINE,), "LSPINE": (SPINE,), "SSPINE": (SPINE,),
    "BREAST": (BREAST,), "HEART": (HEART,), "SHOULDER": (UPPER,), "CLAVICLE": (UPPER,),
    "ELBOW": (UPPER,), "WRIST": (UPPER,), "HAND": (UPPER,), "HUMERUS": (UPPER,), "ARM": (UPPER,),
    "HIP": (LOWER,), "KNEE": (LOWER,), "ANKLE": (LOWER,), "FOOT": (LOWER,), "FEMUR": (LOWER,),
    "LEG": (LOWER,), "EXTREMITY": (UPPER, LOWER), "WHOLEBODY": _ALL,
}  # fmt: skip

# Words of descriptions, folded (upper case, no accents); a trailing * matches any word it
# begins (the longest such prefix wins: ABDOMINOPELV* before ABDO*).
KEYWORDS: dict[str, tuple[str, ...]] = {
    "HEAD": (HEAD,), "BRAIN": (HEAD,), "SKULL": (HEAD,), "TETE": (HEAD,), "CRANE": (HEAD,),
    "CRANI*": (HEAD,), "CEREBR*": (HEAD,), "CERVEAU": (HEAD,), "ENCEPHAL*": (HEAD,),
    "NEURO*": (HEAD,), "SINUS": (HEAD,), "ORBIT*": (HEAD,),
    "NECK": (NECK,), "COU": (NECK,), "THYROID*": (NECK,), "CERVICAL": (NECK,),
    "CHEST": (CHEST,), "THORAX": (CHEST,), "THORAC*": (CHEST,), "LUNG*": (CHEST,),
    "POUMON*": (CHEST,), "PULMO*": (CHEST,), "THORACOABDO*": (CHEST, ABDOMEN),
    "ABDOMEN": (ABDOMEN,), "ABDO*": (ABDOMEN,), "LIVER": (ABDOMEN,), "FOIE": (ABDOMEN,),
    "HEPAT*": (ABDOMEN,), "PANCREA*": (ABDOMEN,), "KIDNEY*": (ABDOMEN,), "REIN": (ABDOMEN,),
    "REINS": (ABDOMEN,), "RENAL*": (ABDOMEN,), "ABDOMINOPELV*": (ABDOMEN, PELVIS),
    "PELVIS": (PELVIS,), "PELVI*": (PELVIS,), "BASSIN": (PELVIS,), "PROSTAT*": (PELVIS,),
    "UTER*": (PELVIS,), "BLADDER": (PELVIS,), "VESSIE": (PELVIS,),
    "TAP": (CHEST, ABDOMEN, PELVIS),  # French "TDM TAP": thorax, abdomen, pelvis
    "SPINE": (SPINE,), "RACHI*": (SPINE,), "LOMBAIRE": (SPINE,), "LUMBAR": (SPINE,),
    "LOMBO*": (SPINE,), "VERTEBR*": (SPINE,), "DORSAL": (SPINE,),
    "BREAST*": (BREAST,), "SEIN": (BREAST,), "SEINS": (BREAST,), "MAMMO*": (BREAST,), "MAMMAIRE": (BREAST,),
    "HEART": (HEART,), "CARDI*": (HEART,), "COEUR": (HEART,), "CORONA*": (HEART,),
    "SHOULDER": (UPPER,), "EPAULE": (UPPER,), "ELBOW": (UPPER,), "COUDE": (UPPER,), "WRIST": (UPPER,),
    "POIGNET": (UPPER,), "HAND": (UPPER,), "MAIN": (UPPER,), "ARM": (UPPER,), "BRAS": (UPPER,),
    "HUMER*": (UPPER,),
    "KNEE": (LOWER,), "GENOU*": (LOWER,), "HIP": (LOWER,), "HANCHE*": (LOWER,), "ANKLE": (LOWER,),
    "CHEVILLE": (LOWER,), "FOOT": (LOWER,), "PIED*": (LOWER,), "LEG": (LOWER,), "JAMBE": (LOWER,),
    "FEMUR": (LOWER,), "TIBIA": (LOWER,),
}  # fmt: skip
_EXACT = {k: v for k, v in KEYWORDS.items() if not k.endswith("*")}
_PREFIXES = sorted(((k[:-1], v) for k, v in KEYWORDS.items() if k.endswith("*")), key=lambda kv: -len(kv[0]))
_WORD = re.compile(r"[A-Z0-9]+")
# Series whose modality says nothing of the images a reader compares (PS3.3 C.7.3.1.1.1).
_NOT_IMAGES = {"SR", "KO", "PR", "DOC", "REG", "SEG", "RWV", "FID", "PLAN", "RTPLAN", "RTSTRUCT", "RTRECORD"}
_FAMILY = {"DX": "CR", "DR": "CR"}  # computed and digital radiography: one kind of image


@dataclass(frozen=True)
class Reason:
    rule: str  # a key of POINTS
    points: int
    detail: str


@dataclass(frozen=True)
class Prior:
    study: StudySummary
    score: int
    reasons: tuple[Reason, ...]


def modalities_of(study: StudySummary) -> set[str]:
    """The image modalities of a study, radiography counted as one (CR)."""
    return {_FAMILY.get(m, m) for m in study.modalities if m not in _NOT_IMAGES}


def regions_of(study: StudySummary) -> dict[str, str]:
    """The body regions a study shows, each with the first evidence found for it."""
    found: dict[str, str] = {}

    def add(regions: Sequence[str], evidence: str) -> None:
        for region in regions:
            found.setdefault(region, evidence)

    for series in study.series:
        if series.BodyPartExamined:
            term = series.BodyPartExamined.strip().upper()
            regions = BODY_PART_REGIONS.get(term) or _words_regions(term)
            add(regions, f"BodyPartExamined {term}")
        for scheme, code in series.anatomy:
            term_of = term_of_code(scheme, code)
            if term_of:
                add(BODY_PART_REGIONS.get(term_of, ()), f"anatomic region {scheme} {code}")
    for text in [study.StudyDescription] + [s.SeriesDescription for s in study.series]:
        if text:
            for word in _words(text):
                add(_word_regions(word), f"description word {word}")
    return found


def rank_priors(
    current: StudySummary, others: Sequence[StudySummary], limit: int, last: int = 2
) -> list[Prior]:
    """The ``limit`` best priors of ``current`` among ``others`` (the patient's other studies,
    newest first), by the rules of the module docstring."""
    today = _day(current.StudyDate)
    candidates = [s for s in others if today is None or (d := _day(s.StudyDate)) is None or d <= today]
    latest = {s.StudyInstanceUID for s in sorted(candidates, key=_newest_first)[:last]}
    modalities, regions = modalities_of(current), regions_of(current)
    ranked = []
    for study in candidates:
        reasons = []
        common = sorted(modalities & modalities_of(study))
        if common:
            reasons.append(Reason("modality", POINTS["modality"], "same modality: " + ", ".join(common)))
        theirs = regions_of(study)
        shared = [region for region in regions if region in theirs]
        if shared:
            detail = "; ".join(f"{r} (this study: {regions[r]}; prior: {theirs[r]})" for r in shared)
            reasons.append(Reason("region", POINTS["region"], "same body region: " + detail))
        then = _day(study.StudyDate)
        if today is not None and then is not None:
            days = (today - then).days
            if days <= _RECENT_DAYS:
                reasons.append(Reason("recent", POINTS["recent"], f"{days} days before"))
            elif days <= _OLDER_DAYS:
                reasons.append(Reason("older", POINTS["older"], f"{days} days before (within 5 years)"))
        if study.StudyInstanceUID in latest:
            reasons.append(Reason("last", POINTS["last"], f"one of the last {last} studies"))
        ranked.append(Prior(study, sum(r.points for r in reasons), tuple(reasons)))
    ranked.sort(key=lambda p: (-p.score, _newest_first(p.study)))
    return ranked[:limit]


def best_priors(registry: Registry, study: str, restriction: Restriction | None, count: int) -> list[Prior]:
    """The ``count`` best priors of ``study`` that share its modality or body region (recency
    alone does not make a study worth opening beside another): what a viewer opens with it (IHE
    Invoke Image Display) and what prefetch warms. Blocking: run it in a worker thread."""
    current, others = study_history(registry, study, restriction, CANDIDATES)
    if current is None:
        return []
    ranked = rank_priors(current, others.studies, CANDIDATES)
    return [p for p in ranked if any(r.rule in ("modality", "region") for r in p.reasons)][:count]


def _newest_first(study: StudySummary) -> tuple[int, str, str, str]:
    # Undated studies last; then date and time descending (as strings: inverted by sorting on
    # their negation would need numbers), then UID for a stable order.
    date_key = study.StudyDate or ""
    time_key = study.StudyTime or ""
    return (0 if date_key else 1, _inverted(date_key), _inverted(time_key), study.StudyInstanceUID)


def _inverted(text: str) -> str:
    """A string that sorts in the opposite order of ``text`` (digits and dots only)."""
    return "".join(chr(0x7F - ord(c)) if c.isascii() else c for c in text) + "\x7f"


def _day(value: str | None) -> date | None:
    if not value or len(value) != 8 or not value.isdigit():
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def _words(text: str) -> list[str]:
    folded = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in folded if not unicodedata.combining(c)).upper()
    return _WORD.findall(plain)


def _word_regions(word: str) -> tuple[str, ...]:
    exact = _EXACT.get(word)
    if exact is not None:
        return exact
    for prefix, regions in _PREFIXES:
        if word.startswith(prefix):
            return regions
    return ()


def _words_regions(text: str) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for word in _words(text):
        out.update(dict.fromkeys(_word_regions(word)))
    return tuple(out)
