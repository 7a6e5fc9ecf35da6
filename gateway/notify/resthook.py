"""FHIR R4 rest-hook notifications: what is POSTed to a subscriber's endpoint, and the POST.

The notification is a ``history`` Bundle whose first entry is a Parameters resource shaped like a
SubscriptionStatus, as the HL7 Subscriptions R5 Backport IG does for R4 (its
``backport-subscription-notification-r4`` profile): the subscription, the topic (one per event
kind: ``study-available``, ``study-updated``, ``study-removed``), ``event-notification``, and a
``notification-event`` naming the event number (the change feed's ``seq``: increasing per
subscriber, with gaps where the subscriber was not concerned) and its focus, the ImagingStudy as a
conditional reference by its Study Instance UID (``ImagingStudy?identifier=urn:dicom:uid|urn:oid:…``).
Then the DICOMweb Endpoint (the gateway's base). That is the whole default ``id-only`` payload:
the receiver fetches the rest with its own credentials, so a notification carries nothing the
subscriber could not read itself. ``full`` adds a minimal ImagingStudy (subject INS, modalities,
counts, start). Every resource is a validated ``fhir.resources.R4B`` model.

The POST follows no redirect (a 3xx is a failure: the endpoint is an address the operator
allowed, not wherever it points), must end within the deadline (connect, send, status line),
and only a 2xx status acknowledges it; the answer's body is dropped (read up to 64 KiB, so
that the connection serves the next notification).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import orjson
from fhir.resources.R4B.bundle import Bundle

__all__ = [
    "Notice",
    "Outcome",
    "notification",
    "notification_body",
    "post_notification",
    "FHIR_JSON",
    "INS_SYSTEM",
]

FHIR_JSON = "application/fhir+json"
INS_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"  # INS-NIR (ANS)
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_MAX_ANSWER = 64 * 1024  # bytes of a receiver's answer read (and dropped) at most


@dataclass(frozen=True)
class Notice:
    """What one delivery tells: an event of the feed, for one subscription."""

    subscription: str
    seq: int
    kind: str  # "study.available", "study.updated", "study.removed"
    time: float
    StudyInstanceUID: str
    patient: str | None
    base_url: str  # the gateway's public URL: the DICOMweb Endpoint and links are under it
    payload: str = "id-only"
    study: dict[str, Any] = field(default_factory=dict)  # "full": the study's QIDO columns


@dataclass(frozen=True)
class Outcome:
    """How a delivery attempt ended: ``ok`` when the receiver acknowledged it."""

    ok: bool
    status: int  # the receiver's HTTP status; 200/502 for an MLLP AA/AE; 502 unreachable, 504 deadline
    error: str | None = None
    sent: int = 0  # bytes sent


def _instant(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def study_reference(uid: str) -> str:
    return f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}"


def notification(notice: Notice) -> Bundle:
    """The notification Bundle for ``notice`` (a validated model)."""
    return Bundle.model_validate(_bundle(notice))


def notification_body(notice: Notice) -> bytes:
    """The notification as sent: the JSON of the Bundle, once it validated as the model.
    (Written from the validated dictionary: the model's own serializer costs a millisecond and
    a half more per notification, and writes the same resource.)"""
    bundle = _bundle(notice)
    Bundle.model_validate(bundle)
    return orjson.dumps(bundle)


def _bundle(notice: Notice) -> dict[str, Any]:
    base = notice.base_url
    focus = {"reference": study_reference(notice.StudyInstanceUID), "type": "ImagingStudy"}
    status = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "subscription",
                "valueReference": {"reference": f"{base}/api/subscriptions/{notice.subscription}"},
            },
            {
                "name": "topic",
                "valueCanonical": f"{base}/fhir/SubscriptionTopic/{notice.kind.replace('.', '-')}",
            },
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": str(notice.seq)},
                    {"name": "timestamp", "valueInstant": _instant(notice.time)},
                    {"name": "focus", "valueReference": focus},
                ],
            },
        ],
    }
    endpoint_url = f"urn:uuid:{uuid.uuid4()}"
    endpoint = {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": f"{base}/dicom-web",
    }
    entries: list[dict[str, Any]] = [
        _entry(f"urn:uuid:{uuid.uuid4()}", status, f"Subscription/{notice.subscription}/$status"),
        _entry(endpoint_url, endpoint, "Endpoint?connection-type=dicom-wado-rs"),
    ]
    if notice.payload == "full" and notice.kind != "study.removed":
        entries.append(
            _entry(
                f"urn:uuid:{uuid.uuid4()}",
                _imaging_study(notice, endpoint_url),
                study_reference(notice.StudyInstanceUID),
            )
        )
    return {"resourceType": "Bundle", "type": "history", "timestamp": _instant(time.time()), "entry": entries}


def _entry(full_url: str, resource: dict[str, Any], url: str) -> dict[str, Any]:
    # R4 bdl-3/bdl-4: a history Bundle's entries carry a request and a response.
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "GET", "url": url},
        "response": {"status": "200"},
    }


def _imaging_study(notice: Notice, endpoint: str) -> dict[str, Any]:
    study = notice.study
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{notice.StudyInstanceUID}"}],
        "subject": {"identifier": {"system": INS_SYSTEM, "value": notice.patient}, "type": "Patient"},
        "endpoint": [{"reference": endpoint}],
    }
    modalities = [m for m in str(study.get("ModalitiesInStudy") or "").replace("\\", ",").split(",") if m]
    if modalities:
        resource["modality"] = [{"system": _DCM, "code": m} for m in modalities]
    for key, name in (
        ("NumberOfStudyRelatedSeries", "numberOfSeries"),
        ("NumberOfStudyRelatedInstances", "numberOfInstances"),
    ):
        if isinstance(study.get(key), int):
            resource[name] = study[key]
    if description := study.get("StudyDescription"):
        resource["description"] = str(description)[:1024]
    date = str(study.get("StudyDate") or "")
    if len(date) == 8 and date.isdigit():
        resource["started"] = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    if accession := study.get("AccessionNumber"):
        resource["identifier"].append(
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
                },
                "value": str(accession),
            }
        )
    return resource


async def post_notification(
    client: httpx.AsyncClient, url: str, body: bytes, header: str | None, deadline: float
) -> Outcome:
    """POST ``body`` to ``url`` within ``deadline`` seconds, following no redirect; the answer's
    status decides, its body is dropped."""
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if header:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    try:
        with anyio.fail_after(deadline):
            async with client.stream(
                "POST",
                url,
                content=body,
                headers=headers,
                follow_redirects=False,
                timeout=httpx.Timeout(deadline),
            ) as response:
                status = response.status_code
                # A short answer is read (the connection is then reused); a long one is not.
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read > _MAX_ANSWER:
                        break
    except TimeoutError:
        return Outcome(False, 504, f"no answer within {deadline:g} s")
    except httpx.TimeoutException:
        return Outcome(False, 504, f"no answer within {deadline:g} s")
    except httpx.HTTPError as exc:
        return Outcome(False, 502, f"{type(exc).__name__}: {exc}"[:200])
    except OSError as exc:
        return Outcome(False, 502, f"{type(exc).__name__}: {exc}"[:200])
    if 200 <= status < 300:
        return Outcome(True, status, sent=len(body))
    why = "a redirect (not followed)" if 300 <= status < 400 else "not a 2xx"
    return Outcome(False, status, f"answered {status}: {why}", len(body))
