"""Turning one parsed header into what the registry stores: QIDO columns and DICOM JSON.

Done once per instance at harvest, never per request (PS3.18 Annex F). BulkDataURIs are stored
relative (``/studies/.../bulk/TAGPATH``) and completed with the gateway's base URL when served:
in DICOM JSON the key ``"BulkDataURI":"`` cannot occur inside a string value (quotes are escaped),
so the HTTP layer can prefix every URI with one ``bytes.replace``.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

import orjson
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from gateway.codec.attributes import INSTANCE, PATIENT, SERIES, STUDY
from gateway.codec.dicomjson import dataset_json
from gateway.errors import DicomFileError
from gateway.types import PixelInfo

__all__ = [
    "InstanceRecord",
    "build_record",
    "record_from_json",
    "national_identity",
    "INS_ISSUERS",
    "fold_text",
    "normalize_time",
    "BULK_KEY",
]

BULK_KEY = b'"BulkDataURI":"'


@dataclass(frozen=True)
class InstanceRecord:
    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    metadata: bytes  # this instance's DICOM JSON object (one element of a metadata array)

    @property
    def uids(self) -> tuple[str, str, str]:
        return (
            self.study["StudyInstanceUID"],
            self.series["SeriesInstanceUID"],
            self.instance["SOPInstanceUID"],
        )


def fold_text(value: str) -> str:
    """Case- and accent-insensitive form used for person-name matching (PS3.4 C.2.2.2.1 leaves the
    case sensitivity of PN matching to the SCP; users expect "muller" to find "Müller")."""
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def name_words(value: str) -> str:
    """Space-delimited name components, for fuzzy (component prefix) matching."""
    for separator in "^=,":
        value = value.replace(separator, " ")
    return " " + " ".join(fold_text(value).split()) + " "


def normalize_time(value: str) -> str:
    """TM as HHMMSS.FFFFFF so that string order is time order (PS3.5 6.2: HH, HHMM are valid)."""
    value = value.strip().replace(":", "")
    whole, _, fraction = value.partition(".")
    return (whole + "000000"[len(whole) :]) + "." + (fraction + "000000")[:6]


def build_record(ds: Dataset, pixel: PixelInfo | None) -> InstanceRecord:
    try:
        return _build_record(ds, pixel)
    except DicomFileError:
        raise
    except RecursionError as exc:
        raise DicomFileError("sequences nested too deeply") from exc
    except Exception as exc:  # a value pydicom cannot convert: refuse this file, keep harvesting
        raise DicomFileError(f"invalid element value ({type(exc).__name__}: {exc})") from exc


def _build_record(ds: Dataset, pixel: PixelInfo | None) -> InstanceRecord:
    paths: list[str] = []  # bulk data paths; the URIs need the UIDs, known once the JSON is built

    def placeholder(path: str) -> str:
        paths.append(path)
        return f"\x00{len(paths) - 1}"

    body = dataset_json(ds, placeholder)
    uids = (_uid(body, "0020000D"), _uid(body, "0020000E"), _uid(body, "00080018"))
    base = f"/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/bulk/"
    if paths:
        _resolve_bulk(body, base, paths)
    # Text is served as UTF-8 whatever the file's character set (PS3.18 F.2: JSON is UTF-8).
    if "00080005" in body:
        body["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    if pixel is not None:
        body["7FE00010"] = {"vr": pixel.vr, "BulkDataURI": base + "7FE00010"}
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax:
        # The stored syntax, from the file meta: clients (and gateways that use this one as a
        # source) know what frames and instances will come as without asking for them.
        body["00020010"] = {"vr": "UI", "Value": [str(syntax)]}
    return _record(body, uids)


def record_from_json(body: dict[str, Any]) -> InstanceRecord:
    """The record of an instance known by its DICOM JSON (from an upstream /metadata), whose
    BulkDataURIs the source already pointed at this gateway."""
    try:
        uids = (_uid(body, "0020000D"), _uid(body, "0020000E"), _uid(body, "00080018"))
        body = dict(body)
        body["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}  # JSON text is UTF-8 already
        return _record(body, uids)
    except DicomFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise DicomFileError(f"malformed DICOM JSON ({type(exc).__name__}: {exc})") from exc


def _record(body: dict[str, Any], uids: tuple[str, str, str]) -> InstanceRecord:
    columns = {
        level: _columns(body, keys)
        for level, keys in (
            ("patient", PATIENT),
            ("study", STUDY),
            ("series", SERIES),
            ("instance", INSTANCE),
        )
    }
    columns["patient"].setdefault("PatientID", "")
    columns["patient"].setdefault("IssuerOfPatientID", "")
    columns["patient"]["INS"] = national_identity(body)
    for level, keyword, uid in zip(
        ("study", "series", "instance"), ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), uids
    ):
        columns[level][keyword] = uid
    return InstanceRecord(
        columns["patient"],
        columns["study"],
        columns["series"],
        columns["instance"],
        orjson.dumps(body, option=orjson.OPT_SORT_KEYS),
    )


# The French national health identifier (INS): the NIR and NIA and their test ranges are
# identified by these issuer OIDs (ANS, "Référentiel INS"); it may be the PatientID itself, or one
# of the OtherPatientIDsSequence items, from any site.
INS_ISSUERS = frozenset({"1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11"})


def national_identity(body: dict[str, Any]) -> str | None:
    """The INS of the patient in this DICOM JSON, or None."""
    for item in [body] + list(body.get("00101002", {}).get("Value") or []):  # OtherPatientIDsSequence
        if not isinstance(item, dict):
            continue
        issuers = {_first(item, "00100021")}  # IssuerOfPatientID
        for qualifier in item.get("00100024", {}).get("Value") or []:  # IssuerOfPatientIDQualifiers
            if isinstance(qualifier, dict):
                issuers.add(_first(qualifier, "00400032"))  # UniversalEntityID
        identifier = _first(item, "00100020")
        if identifier and issuers & INS_ISSUERS:
            return identifier
    return None


def _first(item: dict[str, Any], tag: str) -> str | None:
    values = item.get(tag, {}).get("Value")
    return str(values[0]) if values and values[0] is not None else None


def _uid(body: dict[str, Any], tag: str) -> str:
    values = body.get(tag, {}).get("Value")
    if not values or not values[0]:
        raise DicomFileError(f"missing UID ({tag})")
    return str(values[0])


def _resolve_bulk(node: Any, base: str, paths: list[str]) -> None:
    """Replace the placeholder BulkDataURIs with the gateway's URIs (rare: large binary values)."""
    if isinstance(node, dict):
        uri = node.get("BulkDataURI")
        if isinstance(uri, str) and uri.startswith("\x00"):
            node["BulkDataURI"] = base + paths[int(uri[1:])]
        for value in node.values():
            if isinstance(value, dict | list):
                _resolve_bulk(value, base, paths)
    elif isinstance(node, list):
        for item in node:
            _resolve_bulk(item, base, paths)


def _columns(body: dict[str, Any], keywords: tuple[str, ...]) -> dict[str, Any]:
    """QIDO columns from the DICOM JSON just built: one conversion serves both."""
    out: dict[str, Any] = {}
    for keyword in keywords:
        element = body.get(_TAGS[keyword])
        if element is None:
            continue
        values = element.get("Value")
        if not values or values[0] is None:
            continue
        if element["vr"] == "PN":
            out[keyword] = "\\".join(_pn_string(v) for v in values)
        elif element["vr"] in ("IS", "US", "UL", "SS", "SL"):
            out[keyword] = int(values[0])
        else:
            out[keyword] = "\\".join("" if v is None else str(v) for v in values)
    for keyword in ("PatientName", "ReferringPhysicianName"):
        if keyword in out:
            out[f"{keyword}_fold"] = fold_text(out[keyword])
            out[f"{keyword}_words"] = name_words(out[keyword])
    for keyword in ("StudyTime", "SeriesTime", "ContentTime", "PerformedProcedureStepStartTime"):
        if keyword in out:
            out[f"{keyword}_norm"] = normalize_time(out[keyword])
    return out


def _pn_string(value: dict[str, str]) -> str:
    groups = [value.get("Alphabetic", ""), value.get("Ideographic", ""), value.get("Phonetic", "")]
    return "=".join(groups).rstrip("=")


_TAGS = {keyword: f"{tag_for_keyword(keyword):08X}" for keyword in PATIENT + STUDY + SERIES + INSTANCE}


def person_name_json(value: str) -> dict[str, str]:
    """PN as component groups (PS3.18 F.2.2): 'A=I=P' -> Alphabetic / Ideographic / Phonetic."""
    groups = value.split("=")
    out = {}
    for key, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups):
        if group:
            out[key] = group
    return out
