"""HL7 v2.5 ORU^R01 over MLLP: a study's arrival told to a RIS or an EHR in the messages they
already take.

The message (``oru_r01``, built with the ``hl7`` library, no I/O):

    MSH  sending GATEWAY, message ORU^R01^ORU_R01, a control id stable across retries (the
         subscription and the event number: a receiver can discard a repeat), version 2.5
    PID  PID-3 the patient's INS (assigning authority 1.2.250.1.213.1.4.8, type INS)
    OBR  OBR-3 the accession number (filler order), OBR-4 the modalities (CT/MR) and the
         description, OBR-7 the study date and time, OBR-24 the first modality, OBR-25 F
         (available, updated) or X (removed)
    OBX  1: the Study Instance UID (DCM 110180, HD); 2: the study's DICOMweb URL (RP)

``send`` writes it in an MLLP block (``hl7.mllp.open_hl7_connection``) and reads one
acknowledgement, all within the deadline: MSA-1 AA (or CA) acknowledges; AE, AR, anything else,
no answer, or a closed connection is a failure, retried later.
"""

from __future__ import annotations

import re
import time
from typing import Any

import anyio
import hl7
from hl7.exceptions import HL7Exception
from hl7.mllp import InvalidBlockError, open_hl7_connection

from gateway.notify.resthook import Notice, Outcome

__all__ = ["oru_r01", "send"]

_INS_OID = "1.2.250.1.213.1.4.8"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: Any, limit: int = 64) -> str:
    """A value as one HL7 field component: no control character, delimiters escaped, bounded."""
    text = _CONTROL.sub(" ", str(value or ""))[:limit]
    return str(hl7.Message("\r").escape(text))


def oru_r01(notice: Notice) -> hl7.Message:
    """The ORU^R01 telling ``notice`` (pure)."""
    study = notice.study
    uid = _clean(notice.StudyInstanceUID)
    control = f"{notice.subscription[:8]}{notice.seq}"[:20]  # MSH-10: at most 20 characters
    modalities = [
        _clean(m, 16) for m in str(study.get("ModalitiesInStudy") or "").replace("\\", ",").split(",") if m
    ]
    status = "X" if notice.kind == "study.removed" else "F"
    url = _clean(f"{notice.base_url}/dicom-web/studies/{notice.StudyInstanceUID}", 512)
    now = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    when = _clean(study.get("StudyDate"), 8) + _clean(study.get("StudyTime"), 6).split(".")[0]
    service = f"{'/'.join(modalities) or 'IMG'}^{_clean(study.get('StudyDescription'))}"
    obr = ["OBR", "1", "", _clean(study.get("AccessionNumber")), service, "", "", when]
    obr += [""] * 16 + [modalities[0] if modalities else "", status]  # OBR-24, OBR-25
    segments = [
        f"MSH|^~\\&|GATEWAY|GATEWAY|||{now}||ORU^R01^ORU_R01|{control}|P|2.5",
        f"PID|1||{_clean(notice.patient)}^^^ASIP-SANTE-INS-NIR&{_INS_OID}&ISO^INS",
        "|".join(obr),
        f"OBX|1|HD|110180^Study Instance UID^DCM||{uid}||||||{status}",
        f"OBX|2|RP|STUDY-URL^Study URL^L||{url}^URI||||||{status}",
    ]
    return hl7.parse("\r".join(segments))


async def send(host: str, port: int, message: hl7.Message, deadline: float) -> Outcome:
    """``message`` over MLLP to host:port; its acknowledgement decides."""
    body = str(message)
    try:
        with anyio.fail_after(deadline):
            reader, writer = await open_hl7_connection(host, port, encoding="utf-8")
            try:
                writer.writemessage(message)
                await writer.drain()
                ack = await reader.readmessage()
            finally:
                writer.close()
    except TimeoutError:
        return Outcome(False, 504, f"no acknowledgement within {deadline:g} s")
    except (OSError, ValueError, EOFError) as exc:  # refused, reset, a block over the limit
        return Outcome(False, 502, f"{type(exc).__name__}: {exc}"[:200])
    except (InvalidBlockError, HL7Exception) as exc:  # not an MLLP block, not an HL7 message
        return Outcome(False, 502, f"no acknowledgement ({type(exc).__name__})")
    try:
        code = str(ack.segment("MSA")[1])
    except (KeyError, IndexError):
        return Outcome(False, 502, "the answer holds no MSA segment", len(body))
    if code in ("AA", "CA"):
        return Outcome(True, 200, sent=len(body))
    return Outcome(False, 502, f"acknowledged {code[:8]}", len(body))
