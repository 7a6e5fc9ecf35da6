"""Whose truth an instance takes when several sources hold it: source priority, for metadata and
pixels alike. A source never rewrites another source's truth.

Each instance row keeps a fingerprint of what identifies it: patient, study, series and pixel
geometry (a copy in another transfer syntax is the same instance; a copy under another patient or
with other dimensions is not), and, for people, the source its metadata came from (``held_by``).
Every location of an instance shares its fingerprint. A write from source S, for each instance:

- new, or held by S alone: S's metadata is written;
- held by others too, the same fingerprint: S's copy is one more location; S's metadata replaces
  theirs only when S has the better priority (lower number);
- held by others too, another fingerprint: a conflict. The better priority wins: if it is S, the
  others' copies become conflicts; if not, S's copy does. A conflicting copy is not a location: it
  is never served, and it is listed (``gateway sources``) and logged.

The same rule holds at study level: a record whose study belongs to another patient may move the
study only if its source outranks every other source holding instances of that study; otherwise its
copy is a conflict ("study X belongs to another patient"). So harvesting a low-priority folder, or
learning what a PACS sent, can never file a study under another patient.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.registry.database import in_chunks
from gateway.registry.record import InstanceRecord

__all__ = ["Verdict", "arbitrate", "fingerprint"]



def fingerprint(record: InstanceRecord) -> str:
    """What must agree between two copies of one instance for them to be the same instance."""
    identity = [
        record.patient.get("PatientID"),
        record.patient.get("IssuerOfPatientID"),
        *record.uids[:2],
        *(record.instance.get(k) for k in ("Rows", "Columns", "NumberOfFrames", "BitsAllocated")),
    ]
    return hashlib.sha256(orjson.dumps(identity)).hexdigest()[:24]


@dataclass
class Verdict:
    write: list[InstanceRecord] = field(default_factory=list)  # metadata this source's copy sets
    located: set[str] = field(default_factory=set)  # instances this copy is a location of
    refused: dict[str, str] = field(default_factory=dict)  # instance -> why this copy conflicts
    displaced: dict[str, str] = field(default_factory=dict)  # instance -> why others' copies do
    displaced_studies: dict[str, str] = field(default_factory=dict)  # study -> why others' copies do


def arbitrate(conn: Any, source: str, ranks: Mapping[str, int], records: Sequence[InstanceRecord]) -> Verdict:
    """Decide, for each record ``source`` brings, what it may write (see the module docstring)."""
    rank = ranks.get(source, math.inf)
    verdict = Verdict()
    stored = _rows(conn, "SELECT SOPInstanceUID, held_by, fingerprint FROM instances WHERE SOPInstanceUID", [
        r.uids[2] for r in records
    ])  # fmt: skip
    copies = _rows(conn, "SELECT DISTINCT SOPInstanceUID, source FROM locations WHERE SOPInstanceUID", [
        r.uids[2] for r in records
    ])  # fmt: skip
    study_uids = sorted({r.uids[0] for r in records})
    owners = _rows(
        conn,
        "SELECT st.StudyInstanceUID, p.PatientID, p.IssuerOfPatientID FROM studies st "
        "JOIN patients p ON p.id = st.patient WHERE st.StudyInstanceUID",
        study_uids,
    )
    holders: dict[str, float] = {}
    for study, holder in _rows(
        conn,
        "SELECT DISTINCT se.StudyInstanceUID, l.source FROM locations l "
        "JOIN instances i ON i.SOPInstanceUID = l.SOPInstanceUID "
        "JOIN series se ON se.SeriesInstanceUID = i.SeriesInstanceUID WHERE se.StudyInstanceUID",
        study_uids,
    ).items():
        for (name,) in holder:
            if name != source:
                holders[study] = min(holders.get(study, math.inf), ranks.get(name, math.inf))
    for record in records:
        study, _, uid = record.uids
        patient = (record.patient.get("PatientID"), record.patient.get("IssuerOfPatientID"))
        owner = owners.get(study)
        if owner and tuple(owner[0]) != patient and study not in verdict.displaced_studies:
            if rank >= holders.get(study, math.inf):
                verdict.refused[uid] = (
                    f"its study {study} belongs to another patient at a source of higher or equal priority"
                )
                continue
            verdict.displaced_studies[study] = (
                f"study {study} refiled under another patient by higher-priority source {source}"
            )
        mine = fingerprint(record)
        known = stored.get(uid)
        other = min(
            (ranks.get(name, math.inf) for (name,) in copies.get(uid, ()) if name != source), default=None
        )
        if known and other is not None:  # other sources hold it: their copies share the stored one's
            if known[0][1] != mine:
                if rank >= other:
                    verdict.refused[uid] = "differs from the copy of a source of higher or equal priority"
                    continue
                verdict.displaced[uid] = f"differs from the copy of higher-priority source {source}"
            elif rank >= other:
                verdict.located.add(uid)  # the same instance: one more place to read it from
                continue
        verdict.write.append(record)
        verdict.located.add(uid)
    return verdict


def _rows(conn: Any, sql: str, keys: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    """``sql`` ends with the key column; the rows for ``keys``, grouped by key."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    for chunk in in_chunks(keys):
        for row in conn.execute(f"{sql} IN ({','.join('?' * len(chunk))})", chunk).fetchall():
            found.setdefault(row[0], []).append(tuple(row[1:]) if len(row) > 2 else (row[1],))
    return found
