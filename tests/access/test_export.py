"""Audit records exported as DICOM audit messages (PS3.15 A.5) and FHIR R4 AuditEvents."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from gateway.access.audit_record import ACTIONS, OUTCOMES, AuditRecord
from gateway.access.export import audit_bundle, dicom_audit_message, fhir_audit_event

SOURCE_ID = "gateway-test"
STUDY = "1.2.826.0.1.3680043.8.498.12345"
PATIENT = "1234567890123"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
RECORD = AuditRecord(
    time=1_700_000_000.25,  # 2023-11-14T22:13:20.250Z
    request_id="req-7f3a",
    actor="10003456789",
    role="professional",
    action="retrieve",
    outcome="success",
    status=200,
    patient=PATIENT,
    study=STUDY,
    organization="750712184",
    client="192.0.2.10",
    bytes_sent=52_428,
    path=f"/studies/{STUDY}",
    source="pacs-a",
)

# (action, EventID, EventActionCode): PS3.15 A.5.3.10, A.5.3.7, A.5.3.6 and A.5.3.11.
EVENTS = [
    ("query", "110112", "E"),
    ("retrieve", "110104", "R"),
    ("metadata", "110104", "R"),
    ("viewer.open", "110103", "R"),
    ("link.use", "110103", "R"),
    ("link.create", "110113", "E"),
    ("link.revoke", "110113", "E"),
    ("grant.create", "110113", "E"),
    ("grant.revoke", "110113", "E"),
    ("study.hide", "110113", "E"),
    ("study.unhide", "110113", "E"),
    ("emergency.open", "110113", "E"),
    ("link.list", "110112", "E"),
    ("grant.list", "110112", "E"),
    ("hidden.list", "110112", "E"),
    ("emergency.list", "110112", "E"),
    ("audit.read", "110101", "R"),
    ("subscription.create", "110113", "E"),
    ("subscription.list", "110112", "E"),
    ("subscription.revoke", "110113", "E"),
    ("notify.deliver", "110104", "R"),
    ("changes.read", "110112", "E"),
    ("fhir.search", "110112", "E"),
    ("fhir.read", "110112", "E"),
    ("priors.list", "110112", "E"),
    ("other", "110113", "E"),
]
OUTCOME_CODES = [("success", "0"), ("denied", "4"), ("error", "8"), ("incomplete", "8")]


def record(**changes: object) -> AuditRecord:
    if "patient" in changes and "patients" not in changes:  # patients holds the patient too
        changes["patients"] = (changes["patient"],) if changes["patient"] else ()
    return dataclasses.replace(RECORD, **changes)


def message(**changes: object) -> ET.Element:
    return ET.fromstring(dicom_audit_message(record(**changes), SOURCE_ID))


def participant_object(root: ET.Element, id_type: str) -> ET.Element:
    (found,) = root.findall(
        f"ParticipantObjectIdentification/ParticipantObjectIDTypeCode[@csd-code='{id_type}']/.."
    )
    return found


def letters(element: ET.Element, alphabet: dict[str, str]) -> str:
    return "".join(alphabet.get(child.tag, "?") for child in element)


CODED = {"csd-code", "codeSystemName", "originalText", "displayName"}
MESSAGE_PARTS = {
    "EventIdentification": "E",
    "ActiveParticipant": "A",
    "AuditSourceIdentification": "S",
    "ParticipantObjectIdentification": "P",
}
EVENT_PARTS = {"EventID": "I", "EventTypeCode": "T", "EventOutcomeDescription": "D"}
OBJECT_PARTS = {
    "ParticipantObjectIDTypeCode": "C",
    "ParticipantObjectName": "N",
    "ParticipantObjectQuery": "Q",
    "ParticipantObjectDetail": "X",
    "ParticipantObjectDescription": "Y",
}


def assert_coded(element: ET.Element) -> None:
    assert {"csd-code", "codeSystemName", "originalText"} <= set(element.attrib) <= CODED, element.tag
    assert len(element) == 0


def assert_follows_audit_schema(root: ET.Element) -> None:
    """The shape PS3.15 A.5.1 (RELAX NG) requires: element order, attribute names, enumerations."""
    assert root.tag == "AuditMessage"
    assert re.fullmatch("EA+SP*", letters(root, MESSAGE_PARTS))
    event = root.find("EventIdentification")
    assert event is not None
    assert set(event.attrib) <= {"EventActionCode", "EventDateTime", "EventOutcomeIndicator"}
    assert event.get("EventActionCode", "C") in {"C", "R", "U", "D", "E"}
    assert event.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert datetime.fromisoformat(event.attrib["EventDateTime"]).tzinfo is not None
    assert re.fullmatch("IT*D?", letters(event, EVENT_PARTS))
    for child in event:
        if child.tag != "EventOutcomeDescription":
            assert_coded(child)

    participants = root.findall("ActiveParticipant")
    allowed = {"UserID", "AlternativeUserID", "UserName", "UserIsRequestor"}
    allowed |= {"NetworkAccessPointID", "NetworkAccessPointTypeCode"}
    for participant in participants:
        assert {"UserID", "UserIsRequestor"} <= set(participant.attrib) <= allowed
        assert participant.get("UserIsRequestor") in {"true", "false"}
        assert participant.get("NetworkAccessPointTypeCode", "1") in {"1", "2", "3", "4", "5"}
        assert re.fullmatch("R*", letters(participant, {"RoleIDCode": "R"}))
        for role in participant:
            assert_coded(role)
    # A.5.2: never more than one requestor.
    assert [p.get("UserIsRequestor") for p in participants].count("true") <= 1

    source = root.find("AuditSourceIdentification")
    assert source is not None
    assert {"AuditSourceID"} <= set(source.attrib) <= {"AuditSourceID", "AuditEnterpriseSiteID"}
    assert all(child.tag == "AuditSourceTypeCode" and "csd-code" in child.attrib for child in source)

    for item in root.findall("ParticipantObjectIdentification"):
        assert "ParticipantObjectID" in item.attrib
        assert item.get("ParticipantObjectTypeCode", "1") in {"1", "2", "3", "4"}
        assert 1 <= int(item.get("ParticipantObjectTypeCodeRole", "1")) <= 26
        assert re.fullmatch("C[NQ]X*Y*", letters(item, OBJECT_PARTS))  # a name or a query
        assert_coded(item[0])
        for query in item.findall("ParticipantObjectQuery"):
            base64.b64decode(query.text or "", validate=True)
        for detail in item.findall("ParticipantObjectDetail"):
            assert set(detail.attrib) == {"type", "value"}
            base64.b64decode(detail.attrib["value"], validate=True)


# DICOM audit messages


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("action", ACTIONS)
def test_dicom_message_follows_the_audit_message_schema(action, outcome):
    root = message(action=action, outcome=outcome, reason="because", emergency=action.startswith("emergency"))
    assert_follows_audit_schema(root)


@pytest.mark.parametrize("action", ACTIONS)
def test_dicom_message_of_a_sparse_record_follows_the_audit_message_schema(action):
    sparse = {"patient": None, "study": None, "client": None, "source": None, "path": None}
    assert_follows_audit_schema(message(action=action, **sparse))


def test_dicom_message_is_utf8_xml_with_a_declaration():
    data = dicom_audit_message(record(reason="accès refusé"), SOURCE_ID)
    assert data.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    assert ET.fromstring(data).find("EventIdentification/EventOutcomeDescription").text == "accès refusé"


@pytest.mark.parametrize(("action", "event_id", "action_code"), EVENTS, ids=[e[0] for e in EVENTS])
def test_dicom_event_id_and_action_code_follow_the_action(action, event_id, action_code):
    event = message(action=action).find("EventIdentification")
    event_code = event.find("EventID")
    assert (event_code.get("csd-code"), event_code.get("codeSystemName")) == (event_id, "DCM")
    assert event.get("EventActionCode") == action_code


def test_event_catalogue_names_every_action():
    assert sorted(action for action, _, _ in EVENTS) == sorted(ACTIONS)


@pytest.mark.parametrize(("outcome", "indicator"), OUTCOME_CODES)
def test_dicom_outcome_indicator_follows_the_outcome(outcome, indicator):
    assert message(outcome=outcome).find("EventIdentification").get("EventOutcomeIndicator") == indicator


def test_dicom_denial_reason_is_the_outcome_description():
    event = message(outcome="denied", status=403, reason="no grant").find("EventIdentification")
    assert event.findtext("EventOutcomeDescription") == "no grant"


def test_dicom_emergency_access_carries_the_emergency_override_type():
    types = message(emergency=True, reason="coma").findall("EventIdentification/EventTypeCode")
    assert [(t.get("csd-code"), t.get("codeSystemName")) for t in types] == [("110127", "DCM")]


def test_dicom_ordinary_access_has_no_emergency_type():
    assert message().findall("EventIdentification/EventTypeCode") == []


def test_dicom_emergency_open_names_the_override_once():
    types = message(action="emergency.open", emergency=True).findall("EventIdentification/EventTypeCode")
    assert [t.get("csd-code") for t in types] == ["110127"]


def test_dicom_access_change_is_an_object_security_attributes_alert():
    types = message(action="grant.create").findall("EventIdentification/EventTypeCode")
    assert [t.get("csd-code") for t in types] == ["110135"]


def test_dicom_caller_is_the_requestor_at_its_address():
    caller, gateway, source = message().findall("ActiveParticipant")
    assert caller.attrib == {
        "UserID": RECORD.actor,
        "UserIsRequestor": "true",
        "NetworkAccessPointID": "192.0.2.10",
        "NetworkAccessPointTypeCode": "2",
    }
    assert [role.get("originalText") for role in caller] == ["Destination Role ID", "professional"]
    assert (gateway.get("UserID"), gateway.get("UserIsRequestor")) == (SOURCE_ID, "false")
    assert (source.get("UserID"), source.get("UserIsRequestor")) == ("pacs-a", "false")


def test_dicom_client_host_name_is_typed_as_machine_name():
    (caller, *_) = message(client="viewer.hospital.example").findall("ActiveParticipant")
    assert caller.get("NetworkAccessPointTypeCode") == "1"


@pytest.mark.parametrize(
    ("action", "caller_role", "gateway_role"),
    [("query", "110153", "110152"), ("retrieve", "110152", "110153")],
)
def test_dicom_source_and_destination_roles_follow_the_direction(action, caller_role, gateway_role):
    caller, gateway, _ = message(action=action).findall("ActiveParticipant")
    assert caller.find("RoleIDCode").get("csd-code") == caller_role
    assert gateway.find("RoleIDCode").get("csd-code") == gateway_role


def test_dicom_audit_source_is_the_gateway():
    assert message().find("AuditSourceIdentification").get("AuditSourceID") == SOURCE_ID


def test_dicom_patient_is_a_person_in_the_patient_role():
    patient = participant_object(message(), "2")
    assert patient.get("ParticipantObjectID") == PATIENT
    assert patient.get("ParticipantObjectTypeCode") == "1"
    assert patient.get("ParticipantObjectTypeCodeRole") == "1"
    assert patient.find("ParticipantObjectIDTypeCode").get("codeSystemName") == "RFC-3881"


def test_dicom_study_is_a_system_object_identified_by_its_uid():
    study = participant_object(message(), "110180")
    assert study.get("ParticipantObjectID") == STUDY
    assert study.get("ParticipantObjectTypeCode") == "2"
    assert study.get("ParticipantObjectTypeCodeRole") == "3"


def test_dicom_query_object_holds_the_request_path():
    query = participant_object(message(action="query", study=None, path="/studies"), "110181")
    assert query.get("ParticipantObjectTypeCodeRole") == "24"
    assert base64.b64decode(query.findtext("ParticipantObjectQuery")) == b"/studies"


def test_dicom_objects_carry_request_id_and_byte_count():
    details = participant_object(message(), "110180").findall("ParticipantObjectDetail")
    decoded = {d.get("type"): base64.b64decode(d.get("value")).decode() for d in details}
    assert decoded == {"request-id": "req-7f3a", "http-status": "200", "bytes-sent": "52428"}


def test_dicom_record_without_patient_or_study_names_no_object():
    assert message(patient=None, study=None).findall("ParticipantObjectIdentification") == []


def test_dicom_event_time_is_utc():
    stamp = message().find("EventIdentification").get("EventDateTime")
    assert stamp == "2023-11-14T22:13:20.250Z"
    assert datetime.fromisoformat(stamp) == datetime.fromtimestamp(RECORD.time, UTC)


def test_unknown_action_is_refused():
    with pytest.raises(ValueError, match="study.delete"):
        dicom_audit_message(record(action="study.delete"), SOURCE_ID)


# FHIR AuditEvent


def event(**changes: object) -> dict:
    return fhir_audit_event(record(**changes), SOURCE_ID)


def test_fhir_event_is_a_json_ready_audit_event():
    resource = json.loads(json.dumps(event()))
    assert resource["resourceType"] == "AuditEvent"
    assert resource["source"]["observer"] == {"display": SOURCE_ID}


@pytest.mark.parametrize("action", ACTIONS)
def test_fhir_event_carries_the_dicom_message_codes(action):
    changes = {"action": action, "emergency": True, "reason": "coma"}
    root, resource = message(**changes), event(**changes)
    identification = root.find("EventIdentification")
    assert resource["type"]["system"] == DCM
    assert resource["type"]["code"] == identification.find("EventID").get("csd-code")
    assert [c["code"] for c in resource["subtype"]] == [
        t.get("csd-code") for t in identification.findall("EventTypeCode")
    ]
    assert resource["action"] == identification.get("EventActionCode")


@pytest.mark.parametrize(("outcome", "code"), OUTCOME_CODES)
def test_fhir_outcome_follows_the_outcome(outcome, code):
    assert event(outcome=outcome)["outcome"] == code


def test_fhir_denial_reason_is_the_outcome_description():
    assert event(outcome="denied", reason="no grant")["outcomeDesc"] == "no grant"


def test_fhir_emergency_access_is_for_emergency_treatment():
    (purpose,) = event(emergency=True, reason="coma")["purposeOfEvent"]
    assert purpose["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v3-ActReason"
    assert purpose["coding"][0]["code"] == "ETREAT"


def test_fhir_ordinary_access_has_no_purpose_of_event():
    assert "purposeOfEvent" not in event()


def test_fhir_requestor_is_the_caller_at_its_address():
    caller, gateway, _ = event()["agent"]
    assert caller["who"] == {"identifier": {"value": RECORD.actor}}
    assert caller["requestor"] is True
    assert caller["role"] == [{"text": "professional"}]
    assert caller["network"] == {"address": "192.0.2.10", "type": "2"}
    assert (gateway["who"], gateway["requestor"]) == ({"display": SOURCE_ID}, False)


def test_fhir_study_entity_is_identified_by_its_uid():
    study, _ = event()["entity"]
    assert study["what"]["identifier"] == {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}
    assert (study["type"]["code"], study["role"]["code"]) == ("2", "3")


def test_fhir_patient_entity_is_a_person_in_the_patient_role():
    _, patient = event()["entity"]
    assert patient["what"]["identifier"] == {"value": PATIENT}
    assert (patient["type"]["code"], patient["role"]["code"]) == ("1", "1")


def test_fhir_entities_carry_the_request_id():
    for entity in event()["entity"]:
        assert {"type": "request-id", "valueString": "req-7f3a"} in entity["detail"]


def test_fhir_query_entity_holds_the_request_path():
    query, *_ = event(action="query", path="/studies")["entity"]
    assert query["role"]["code"] == "24"
    assert base64.b64decode(query["query"]) == b"/studies"


def test_fhir_recorded_is_utc():
    assert event()["recorded"] == "2023-11-14T22:13:20.250Z"


def test_bundle_is_a_collection_with_one_entry_per_record():
    records = [record(request_id=f"req-{n}") for n in range(3)]
    bundle = audit_bundle(records, SOURCE_ID)
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "collection")
    assert [e["resource"] for e in bundle["entry"]] == [fhir_audit_event(r, SOURCE_ID) for r in records]
