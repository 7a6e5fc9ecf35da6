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
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.errors import DicomFileError
from gateway.registry.attributes import INSTANCE, PATIENT, SERIES, STUDY
from gateway.stream.dicomfile import PixelInfo

__all__ = ["InstanceRecord", "build_record", "fold_text", "normalize_time", "BULK_KEY"]

BULK_KEY = b'"BulkDataURI":"'
# Binary values up to this size are inlined as base64 (PS3.18 F.2.7); larger ones become URIs.
INLINE_LIMIT = 1024
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_MAX_DEPTH = 32  # hostile files: refuse sequences nested deeper than any real IOD


@dataclass(frozen=True)
class InstanceRecord:
    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    metadata: bytes  # this instance's DICOM JSON object (one element of a metadata array)

    @property
    def uids(self) -> tuple[str, str, str]:
        return (self.study["StudyInstanceUID"], self.series["SeriesInstanceUID"],
                self.instance["SOPInstanceUID"])


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
    return (whole + "000000"[len(whole):]) + "." + (fraction + "000000")[:6]


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
    columns = {level: _columns(ds, keys) for level, keys in
               (("patient", PATIENT), ("study", STUDY), ("series", SERIES), ("instance", INSTANCE))}
    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    columns["patient"].setdefault("PatientID", "")
    columns["patient"].setdefault("IssuerOfPatientID", "")
    base = f"/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/bulk/"
    metadata = orjson.dumps(_to_json(ds, base, pixel))
    return InstanceRecord(columns["patient"], columns["study"], columns["series"],
                          columns["instance"], metadata)


def _columns(ds: Dataset, keywords: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keyword in keywords:
        element = ds.data_element(keyword) if keyword in ds else None
        if element is None or element.value in (None, "", b""):
            continue
        value = element.value
        if isinstance(value, (MultiValue, list)):
            out[keyword] = "\\".join(str(v) for v in value)
        elif element.VR in ("US", "UL", "SS", "SL"):
            out[keyword] = int(value)
        elif element.VR == "IS":
            out[keyword] = int(value)
        else:
            out[keyword] = str(value)
    for keyword in ("PatientName", "ReferringPhysicianName"):
        if keyword in out:
            out[f"{keyword}_fold"] = fold_text(out[keyword])
            out[f"{keyword}_words"] = name_words(out[keyword])
    for keyword in ("StudyTime", "SeriesTime", "ContentTime", "PerformedProcedureStepStartTime"):
        if keyword in out:
            out[f"{keyword}_norm"] = normalize_time(out[keyword])
    return out


def _to_json(ds: Dataset, base: str, pixel: PixelInfo | None) -> dict[str, Any]:
    paths = _binary_paths(ds, "", 0)

    def bulk_uri(element: DataElement) -> str:
        return base + paths.get(id(element), f"{element.tag:08X}")

    body: dict[str, Any] = ds.to_json_dict(INLINE_LIMIT, bulk_uri)
    # Text is served as UTF-8 whatever the file's character set (PS3.18 F.2: JSON is UTF-8).
    if "00080005" in body:
        body["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    if pixel is not None:
        body["7FE00010"] = {"vr": pixel.vr, "BulkDataURI": base + "7FE00010"}
    return dict(sorted(body.items()))


def _binary_paths(ds: Dataset, prefix: str, depth: int) -> dict[int, str]:
    """Tag paths of every binary element, for BulkDataURIs inside sequences: 'SEQTAG/index/TAG'."""
    if depth > _MAX_DEPTH:
        raise DicomFileError(f"sequences nested deeper than {_MAX_DEPTH} levels")
    paths: dict[int, str] = {}
    for element in ds:
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                paths.update(_binary_paths(item, f"{prefix}{element.tag:08X}/{index}/", depth + 1))
        elif element.VR in _BINARY_VRS or element.VR.startswith("O"):
            paths[id(element)] = f"{prefix}{element.tag:08X}"
    return paths


def person_name_json(value: str) -> dict[str, str]:
    """PN as component groups (PS3.18 F.2.2): 'A=I=P' -> Alphabetic / Ideographic / Phonetic."""
    groups = value.split("=")
    out = {}
    for key, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups):
        if group:
            out[key] = group
    return out

