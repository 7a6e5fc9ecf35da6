"""Audit records as DICOM audit messages (PS3.15 A.5) and FHIR R4 AuditEvent resources.

Hospitals keep their audit trail in an Audit Record Repository (IHE ATNA, DICOM XML over syslog) or
on a FHIR server (IHE BALP), not in the gateway's own log, so every ``AuditRecord`` can be exported
in both forms. These are pure functions: a record in, bytes or a JSON-ready dict out; sending them is
the caller's business. Both forms come from one event table, so they always agree.

Actions and the PS3.15 A.5.3 messages they become (codes from PS3.16 CID 400 and CID 403):

    query                        Query (110112), E                                        A.5.3.10
    retrieve, metadata           DICOM Instances Transferred (110104), R                  A.5.3.7
    viewer.open, link.use        DICOM Instances Accessed (110103), R                     A.5.3.6
    link.*, grant.*, study.*     Security Alert (110113), E, Object Security Attributes
                                 Changed (110135)                                         A.5.3.11
    emergency.open               Security Alert (110113), E, Emergency Override Started (110127)
    *.list                       Query (110112), E (the caller's access settings)          A.5.3.10
    audit.read                   Audit Log Used (110101), R                                A.5.3.2
    other                        Security Alert (110113), E, Use of Restricted Function
                                 (110132): a request no resource answers                  A.5.3.11

Every record made under emergency rules also carries EventTypeCode 110127 (FHIR: subtype, plus
purposeOfEvent ETREAT), so break-the-glass access is found by one code whatever the action.
"""

from __future__ import annotations

import base64
import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from gateway.access.audit_record import AuditRecord

__all__ = ["dicom_audit_message", "fhir_audit_event", "audit_bundle"]


class _Code(NamedTuple):
    value: str
    scheme: str  # DICOM Coding Scheme Designator
    meaning: str


_QUERY = _Code("110112", "DCM", "Query")
_TRANSFERRED = _Code("110104", "DCM", "DICOM Instances Transferred")
_ACCESSED = _Code("110103", "DCM", "DICOM Instances Accessed")
_SECURITY_ALERT = _Code("110113", "DCM", "Security Alert")
_AUDIT_LOG_USED = _Code("110101", "DCM", "Audit Log Used")
_RESTRICTED = _Code("110132", "DCM", "Use of Restricted Function")
_EMERGENCY = _Code("110127", "DCM", "Emergency Override Started")
_ATTRIBUTES_CHANGED = _Code("110135", "DCM", "Object Security Attributes Changed")
_SOURCE_ROLE = _Code("110153", "DCM", "Source Role ID")
_DESTINATION_ROLE = _Code("110152", "DCM", "Destination Role ID")
_STUDY_UID = _Code("110180", "DCM", "Study Instance UID")
_SOP_CLASS_UID = _Code("110181", "DCM", "SOP Class UID")
_PATIENT_NUMBER = _Code("2", "RFC-3881", "Patient Number")  # PS3.15 A.5.1.2.4
_LOCAL_ROLES = "99GATEWAY"  # a private coding scheme ("99" prefix, PS3.3 8.2) for the caller's role

_SYSTEMS = {"DCM": "http://dicom.nema.org/resources/ontology/DCM"}
_HL7 = "http://terminology.hl7.org/CodeSystem"
_STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # QIDO-RS is the web form of this C-FIND (PS3.18)
# PS3.15 A.5.2: 4 is a minor failure, "action restarted" (a denial: the caller may come back with
# other credentials); 8 a serious one, "action terminated" (the request failed).
# A transfer the client hung up on, or a source broke off, ended prematurely: "terminated", 8.
_OUTCOMES = {"success": "0", "denied": "4", "error": "8", "incomplete": "8"}


class _Event(NamedTuple):
    id: _Code
    action: str  # EventActionCode
    types: tuple[_Code, ...]  # EventTypeCode
    caller_role: _Code | None  # RoleIDCode of the caller, where the message requires one
    gateway_role: _Code | None


# A.5.3.10: the caller issues the query (Source), the gateway answers it (Destination); "E" is required.
_QUERIED = _Event(_QUERY, "E", (), _SOURCE_ROLE, _DESTINATION_ROLE)
# A.5.3.7 rather than Begin Transferring (A.5.3.3, which records intent) or Instances Accessed: the
# bytes leave the gateway for another node, and one record is written per finished request, with
# its outcome and byte count. The gateway is the sender, not the receiver, hence "R".
_SENT = _Event(_TRANSFERRED, "R", (), _DESTINATION_ROLE, _SOURCE_ROLE)
# A.5.3.6: opening a study in the viewer (directly or through a link) is viewing, inside the
# gateway; the bytes the viewer then fetches are audited by their own retrieve records.
_VIEWED = _Event(_ACCESSED, "R", (), None, None)
# A.5.3.11 requires "E" and a DCID 403 type. A link, a grant or hiding a study changes who may see
# the study: 110135 is the CID 403 code for that. A successful one is an informative alert.
_CHANGED = _Event(_SECURITY_ALERT, "E", (_ATTRIBUTES_CHANGED,), None, None)
_EVENTS = {
    "query": _QUERIED,
    "retrieve": _SENT,
    "metadata": _SENT,
    "viewer.open": _VIEWED,
    "link.use": _VIEWED,
    "link.create": _CHANGED,
    "link.revoke": _CHANGED,
    "grant.create": _CHANGED,
    "grant.revoke": _CHANGED,
    "study.hide": _CHANGED,
    "study.unhide": _CHANGED,
    "emergency.open": _Event(_SECURITY_ALERT, "E", (_EMERGENCY,), None, None),
    "link.list": _QUERIED,
    "grant.list": _QUERIED,
    "hidden.list": _QUERIED,
    "emergency.list": _QUERIED,
    # A.5.3.2: the patient reads (part of) the audit trail kept about them.
    "audit.read": _Event(_AUDIT_LOG_USED, "R", (), None, None),
    # A subscription is derived from grants: making or ending one changes what flows where.
    "subscription.create": _CHANGED,
    "subscription.list": _QUERIED,
    "subscription.revoke": _CHANGED,
    "notify.deliver": _SENT,  # A.5.3.7: a notification naming the patient's study leaves the gateway
    "changes.read": _QUERIED,  # the change feed: which studies of the patients named changed
    # A.5.3.10: FHIR searches and the priors list are queries over the index (their answers
    # describe studies, without their instances); reading one ImagingStudy is one too.
    "fhir.search": _QUERIED,
    "fhir.read": _QUERIED,
    "priors.list": _QUERIED,
    "other": _Event(_SECURITY_ALERT, "E", (_RESTRICTED,), None, None),
}


class _Object(NamedTuple):
    id: str  # ParticipantObjectID
    id_type: _Code  # ParticipantObjectIDTypeCode
    type: str  # ParticipantObjectTypeCode: 1 person, 2 system object
    role: str  # ParticipantObjectTypeCodeRole: 1 patient, 3 report, 24 query
    query: bytes | None = None


_TYPE_NAMES = {"1": "Person", "2": "System Object"}
_ROLE_NAMES = {"1": "Patient", "3": "Report", "24": "Query"}


def _event(record: AuditRecord) -> tuple[_Event, str]:
    """The record's event and EventOutcomeIndicator; ValueError for a record no table knows."""
    if record.action not in _EVENTS or record.outcome not in _OUTCOMES:
        raise ValueError(f"no audit event for {record.action!r} ending in {record.outcome!r}")
    return _EVENTS[record.action], _OUTCOMES[record.outcome]


def _types(record: AuditRecord, event: _Event) -> tuple[_Code, ...]:
    if record.emergency and _EMERGENCY not in event.types:
        return (*event.types, _EMERGENCY)
    return event.types


def _objects(record: AuditRecord) -> list[_Object]:
    objects = []
    if record.action == "query":
        # A.5.3.10 Note 2 lets a non-DIMSE query fill the Query field its own way: the record keeps
        # the path only (its query string may hold identifiers), so the path is what is reported.
        path = (record.path or "").encode()
        objects.append(_Object(_STUDY_ROOT_FIND, _SOP_CLASS_UID, "2", "24", path))
    if record.study:
        objects.append(_Object(record.study, _STUDY_UID, "2", "3"))  # A.5.3.6, A.5.3.7 "Studies"
    for patient in record.patients or ((record.patient,) if record.patient else ()):
        objects.append(_Object(patient, _PATIENT_NUMBER, "1", "1"))  # and "Patient", each of them
    return objects


def _details(record: AuditRecord) -> list[tuple[str, str]]:
    return [
        ("request-id", record.request_id),
        ("http-status", str(record.status)),
        ("bytes-sent", str(record.bytes_sent)),
    ]


def _when(record: AuditRecord, event: _Event) -> str:
    # A.5.3.7: a transfer is recorded when it ends; everything else when the request came in.
    return _instant(record.ended if event is _SENT and record.ended is not None else record.time)


def _instant(seconds: float) -> str:
    # A.5.2.5: EventDateTime shall include the time zone.
    moment = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


def _access_point_type(address: str) -> str:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"  # machine name
    return "2"  # IP address


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _coded(parent: ET.Element, tag: str, code: _Code) -> None:
    # A.5.1 CodedValueType: csd-code, codeSystemName and originalText are all required.
    attributes = {"csd-code": code.value, "codeSystemName": code.scheme, "originalText": code.meaning}
    ET.SubElement(parent, tag, attributes)


def dicom_audit_message(record: AuditRecord, source_id: str) -> bytes:
    """The record as a DICOM audit message (PS3.15 A.5.1 schema), UTF-8 XML with its declaration.

    ``source_id`` names this gateway: AuditSourceID and the UserID of its ActiveParticipant.
    """
    event, outcome = _event(record)
    # A.5.1: child elements come in schema order; attributes may come in any.
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(root, "EventIdentification", EventActionCode=event.action)
    identification.set("EventDateTime", _when(record, event))
    identification.set("EventOutcomeIndicator", outcome)
    _coded(identification, "EventID", event.id)
    for code in _types(record, event):
        _coded(identification, "EventTypeCode", code)
    if record.reason:
        ET.SubElement(identification, "EventOutcomeDescription").text = record.reason

    # In a Security Alert the caller is the "reporting person" with the gateway as the reporting
    # process (A.5.3.11, 1..2): "performing persons" may not be the requestor, and the caller is.
    caller = ET.SubElement(root, "ActiveParticipant", UserID=record.actor, UserIsRequestor="true")
    if record.client:
        caller.set("NetworkAccessPointID", record.client)
        caller.set("NetworkAccessPointTypeCode", _access_point_type(record.client))
    if event.caller_role:
        _coded(caller, "RoleIDCode", event.caller_role)
    _coded(caller, "RoleIDCode", _Code(record.role, _LOCAL_ROLES, record.role))
    gateway = ET.SubElement(root, "ActiveParticipant", UserID=source_id, UserIsRequestor="false")
    if event.gateway_role:
        _coded(gateway, "RoleIDCode", event.gateway_role)
    if record.source:  # the archive the bytes came from: one of the "other participants"
        ET.SubElement(root, "ActiveParticipant", UserID=record.source, UserIsRequestor="false")

    audit_source = ET.SubElement(root, "AuditSourceIdentification", AuditSourceID=source_id)
    # A.5.1.2.1: 4, application server process, the value A.5.2 suggests for a PACS.
    ET.SubElement(audit_source, "AuditSourceTypeCode", {"csd-code": "4"})

    for item in _objects(record):
        element = ET.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=item.id)
        element.set("ParticipantObjectTypeCode", item.type)
        element.set("ParticipantObjectTypeCodeRole", item.role)
        _coded(element, "ParticipantObjectIDTypeCode", item.id_type)
        # A.5.1 wants a name or a query. The record holds no names (it keeps identifiers only),
        # so the identifier is its own descriptor.
        if item.query is not None:
            ET.SubElement(element, "ParticipantObjectQuery").text = _b64(item.query)
        else:
            ET.SubElement(element, "ParticipantObjectName").text = item.id
        for kind, value in _details(record):
            ET.SubElement(element, "ParticipantObjectDetail", type=kind, value=_b64(value.encode()))
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _coding(code: _Code) -> dict[str, str]:
    return {"system": _SYSTEMS[code.scheme], "code": code.value, "display": code.meaning}


def _hl7(code_system: str, code: str, display: str) -> dict[str, str]:
    return {"system": f"{_HL7}/{code_system}", "code": code, "display": display}


def _entity(item: _Object, record: AuditRecord) -> dict[str, Any]:
    entity: dict[str, Any] = {}
    if item.id_type == _STUDY_UID:  # as ImagingStudy.identifier writes a Study Instance UID
        identifier = {"system": "urn:dicom:uid", "value": f"urn:oid:{item.id}"}
        entity["what"] = {"type": "ImagingStudy", "identifier": identifier}
    elif item.id_type == _PATIENT_NUMBER:
        entity["what"] = {"type": "Patient", "identifier": {"value": item.id}}
    # FHIR R4 maps ParticipantObjectTypeCode and ...Role to these two code systems, value for value.
    entity["type"] = _hl7("audit-entity-type", item.type, _TYPE_NAMES[item.type])
    entity["role"] = _hl7("object-role", item.role, _ROLE_NAMES[item.role])
    if item.query is not None:
        entity["query"] = _b64(item.query)
    entity["detail"] = [{"type": kind, "valueString": value} for kind, value in _details(record)]
    return entity


def fhir_audit_event(record: AuditRecord, source_id: str) -> dict[str, Any]:
    """The record as a FHIR R4 AuditEvent resource, ready for ``json.dumps``.

    It carries the same codes as :func:`dicom_audit_message`, as FHIR's DICOM mapping prescribes.
    """
    event, outcome = _event(record)
    identifier = (
        {"system": record.issuer, "value": record.actor} if record.issuer else {"value": record.actor}
    )
    caller: dict[str, Any] = {"who": {"identifier": identifier}, "requestor": True}
    if event.caller_role:
        caller["type"] = {"coding": [_coding(event.caller_role)]}
    caller["role"] = [{"text": record.role}]
    if record.client:
        caller["network"] = {"address": record.client, "type": _access_point_type(record.client)}
    gateway: dict[str, Any] = {"who": {"display": source_id}, "requestor": False}
    if event.gateway_role:
        gateway["type"] = {"coding": [_coding(event.gateway_role)]}
    agents = [caller, gateway]
    if record.source:
        agents.append({"who": {"display": record.source}, "requestor": False})

    resource: dict[str, Any] = {"resourceType": "AuditEvent", "type": _coding(event.id)}
    if subtypes := _types(record, event):
        resource["subtype"] = [_coding(code) for code in subtypes]
    resource["action"] = event.action
    resource["recorded"] = _when(record, event)
    resource["outcome"] = outcome
    if record.reason:
        resource["outcomeDesc"] = record.reason
    if record.emergency:
        resource["purposeOfEvent"] = [{"coding": [_hl7("v3-ActReason", "ETREAT", "Emergency Treatment")]}]
    resource["agent"] = agents
    source_type = _hl7("security-source-type", "4", "Application Server")  # as AuditSourceTypeCode
    resource["source"] = {"observer": {"display": source_id}, "type": [source_type]}
    if entities := [_entity(item, record) for item in _objects(record)]:
        resource["entity"] = entities
    return resource


def audit_bundle(
    records: Iterable[AuditRecord], source_id: str, following: str | None = None
) -> dict[str, Any]:
    """The records' AuditEvents in one FHIR Bundle of type "collection", in the records' order;
    ``following``: the URL of the next page, as a "next" link."""
    entries = [{"resource": fhir_audit_event(record, source_id)} for record in records]
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "collection"}
    if following:
        bundle["link"] = [{"relation": "next", "url": following}]
    return bundle | {"entry": entries}
