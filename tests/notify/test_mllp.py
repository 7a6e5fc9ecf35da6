"""HL7 v2.5 ORU^R01 over MLLP to a real listener on loopback (hl7's asyncio server)."""

from __future__ import annotations

import time

import pytest

from gateway.notify.mllp import oru_r01
from gateway.notify.resthook import Notice
from tests.notify.conftest import MllpListener
from tests.notify.support import ALICE, BASE, Feed, config, dispatcher, grant, once, subscribe

pytestmark = pytest.mark.network


def test_an_oru_r01_names_the_patient_the_study_and_its_url():
    study = {"AccessionNumber": "ACC|7", "ModalitiesInStudy": "CT,MR", "StudyDate": "20240102"}
    notice = Notice("0123456789abcdef", 42, "study.available", 0.0, "1.2.3.4", ALICE, BASE, study=study)
    message = oru_r01(notice)
    assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert str(message.segment("MSH")[12]) == "2.5"
    assert str(message.segment("MSH")[10]) == "0123456742"  # stable across retries
    assert str(message.segment("PID")[3][0][0]) == ALICE
    assert str(message.segment("PID")[3]).endswith("&1.2.250.1.213.1.4.8&ISO^INS")
    obr = message.segment("OBR")
    assert str(obr[3]) == r"ACC\F\7"  # the delimiter escaped, not a new field
    assert (str(obr[7]), str(obr[24]), str(obr[25])) == ("20240102", "CT", "F")
    obx = message.segments("OBX")
    assert str(obx[0][5]) == "1.2.3.4"
    assert str(obx[1][5][0][0]) == f"{BASE}/dicom-web/studies/1.2.3.4"


def test_a_study_is_sent_over_mllp_and_acknowledged_with_aa(site, listener):
    grant(site)
    feed = Feed()
    found = dispatcher(site, feed, config(listener.origin))
    subscription = subscribe(found, listener.origin, channel="mllp")
    feed.add(site.studies["alice-1"], ALICE)
    once(found)
    assert len(listener.messages) == 1
    message = listener.messages[0]
    assert str(message.segment("PID")[3][0][0]) == ALICE
    assert str(message.segments("OBX")[0][5]) == site.studies["alice-1"]
    assert str(message.segment("OBR")[24]) == "CT"
    assert [row["state"] for row in found.store.outbox(subscription.id)] == ["delivered"]


def test_an_error_acknowledgement_keeps_the_event_pending(site):
    listener = MllpListener(ack="AE")
    try:
        grant(site)
        feed = Feed()
        found = dispatcher(site, feed, config(listener.origin))
        subscription = subscribe(found, listener.origin, channel="mllp")
        feed.add(site.studies["alice-1"], ALICE)
        once(found)
        assert len(listener.messages) == 1
        row = found.store.outbox(subscription.id)[0]
        assert row["state"] == "pending" and row["error"] == "acknowledged AE"
        listener.ack = "AA"
        time.sleep(0.1)  # past the first retry
        once(found)
        assert found.store.outbox(subscription.id)[0]["state"] == "delivered"
    finally:
        listener.close()
