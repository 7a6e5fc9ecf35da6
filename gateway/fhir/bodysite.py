"""BodyPartExamined (PS3.3 C.7.3.1) as SNOMED CT codings: the defined terms of PS3.16 Annex L
and their codes in CID 4031 "Common Anatomic Regions" (checked against pydicom's copy of the
code tables). A term not in the table is kept as text."""

from __future__ import annotations

__all__ = ["SNOMED", "BODY_PARTS", "body_site", "term_of_code"]

SNOMED = "http://snomed.info/sct"

# BodyPartExamined defined term -> (SNOMED CT code, display).
BODY_PARTS: dict[str, tuple[str, str]] = {
    "ABDOMEN": ("818981001", "Abdomen"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ANKLE": ("70258002", "Ankle joint"),
    "BREAST": ("76752008", "Breast"),
    "BRAIN": ("12738006", "Brain"),
    "CHEST": ("816094009", "Chest"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "CLAVICLE": ("51299004", "Clavicle"),
    "CSPINE": ("122494005", "Cervical spine"),
    "ELBOW": ("16953009", "Elbow joint"),
    "EXTREMITY": ("66019005", "Extremity"),
    "FEMUR": ("71341001", "Femur"),
    "FOOT": ("56459004", "Foot"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEADNECK": ("774007", "Head and Neck"),
    "HEART": ("80891009", "Heart"),
    "HIP": ("29836001", "Hip"),
    "HUMERUS": ("85050009", "Humerus"),
    "KNEE": ("72696002", "Knee"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "NECK": ("45048000", "Neck"),
    "PANCREAS": ("15776009", "Pancreas"),
    "PELVIS": ("816092008", "Pelvis"),
    "PROSTATE": ("41216001", "Prostate"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SKULL": ("89546000", "Skull"),
    "SPINE": ("421060004", "Spine"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "WRIST": ("74670003", "Wrist joint"),
}
_BY_CODE = {code: term for term, (code, _) in BODY_PARTS.items()}
# Codes an older edition of CID 4031 used for the same regions (files written before 2019 carry them).
_BY_CODE |= {"51185008": "CHEST", "113345001": "ABDOMEN", "12921003": "PELVIS", "416949008": "ABDOMENPELVIS"}
# And the SNOMED RT identifiers (scheme SRT) those editions used before SNOMED CT concept ids.
_BY_SRT = {"T-D3000": "CHEST", "T-D4000": "ABDOMEN", "T-D6000": "PELVIS", "T-D1100": "HEAD"}
_BY_SRT |= {"T-A0100": "BRAIN", "T-D1600": "NECK"}


def body_site(term: str) -> dict[str, str]:
    """A FHIR Coding for a BodyPartExamined value: SNOMED CT when the term is a defined one,
    else its text as the display."""
    found = BODY_PARTS.get(term.strip().upper())
    if found is None:
        return {"display": term.strip()}
    return {"system": SNOMED, "code": found[0], "display": found[1]}


def term_of_code(scheme: str, code: str) -> str | None:
    """The BodyPartExamined term of an anatomic region code (SCT; or SRT, SNOMED RT's older
    identifiers), None for a code the table does not know."""
    scheme = scheme.strip().upper()
    if scheme == "SRT":
        return _BY_SRT.get(code.strip().upper())
    return _BY_CODE.get(code.strip()) if scheme == "SCT" else None
