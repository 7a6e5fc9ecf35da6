"""Delivery to a real rest-hook receiver on loopback: what is sent, to whom, in what order, and
what happens when the receiver fails, hangs, redirects, or the grant goes (both backends)."""

from __future__ import annotations

import time

import anyio
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.imagingstudy import ImagingStudy

from gateway.access.audit import AuditLog
from gateway.access.policy import Policy
from gateway.access.store import AccessStore
from gateway.notify.dispatch import Dispatcher
from gateway.notify.store import SubscriptionStore
from tests.notify.support import (
    ALICE,
    BASE,
    BOB,
    Feed,
    config,
    dispatcher,
    grant,
    once,
    revoke,
    subscribe,
    until,
)

pytestmark = pytest.mark.network


def test_a_granted_study_is_posted_as_a_notification_bundle_with_its_endpoint(site, receiver):
    grant(site)
    feed = Feed()
    found = dispatcher(site, feed, config(receiver.origin))
    subscription = subscribe(found, receiver.url, header="Authorization: Bearer receiver-secret")
    event = feed.add(site.studies["alice-1"], ALICE)
    once(found)
    assert receiver.acknowledged() == [event.seq]
    got = receiver.received[0]
    bundle = Bundle.model_validate(got["body"])  # a valid FHIR R4 Bundle
    assert bundle.type == "history"
    status = got["body"]["entry"][0]["resource"]
    assert status["resourceType"] == "Parameters"
    named = {p["name"]: p for p in status["parameter"]}
    assert named["type"]["valueCode"] == "event-notification"
    assert named["subscription"]["valueReference"]["reference"].endswith(subscription.id)
    focus = named["notification-event"]["part"][2]["valueReference"]["reference"]
    assert focus == f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{site.studies['alice-1']}"
    endpoint = got["body"]["entry"][1]["resource"]
    assert endpoint["address"] == f"{BASE}/dicom-web"
    assert ALICE.encode() not in str(got["body"]).encode(), "id-only: no patient identity in the payload"
    assert got["headers"]["authorization"] == "Bearer receiver-secret"
    assert got["headers"]["content-type"] == "application/fhir+json"
    record = [r for r in site.records() if r.action == "notify.deliver"]
    assert [(r.outcome, r.patient, r.study) for r in record] == [("success", ALICE, site.studies["alice-1"])]
    assert "receiver-secret" not in repr(record)


def test_only_events_the_owner_may_see_and_the_scope_holds_are_delivered(site, receiver):
    grant(site)
    grant(site, BOB)
    feed = Feed()
    found = dispatcher(site, feed, config(receiver.origin))
    subscribe(found, receiver.url, patient=ALICE)
    feed.add(site.studies["bob"], BOB)  # granted, but outside the scope
    feed.add(site.studies["nobody"], None)  # no INS: no consent can cover it
    seen = feed.add(site.studies["alice-2"], ALICE)
    feed.add(site.studies["alice-1"], ALICE, kind="instances.added")  # not a study-level event
    once(found)
    assert receiver.acknowledged() == [seen.seq]


def test_a_hidden_study_and_an_ungranted_patient_are_never_queued(site, receiver):
    grant(site)
    patient = site.token("https://portal.test/auth", sub=f"patient-{ALICE}", ins=ALICE)
    assert site.post("/api/hidden", {"StudyInstanceUID": site.studies["alice-2"]}, patient).status_code == 201
    feed = Feed()
    found = dispatcher(site, feed, config(receiver.origin))
    subscription = subscribe(found, receiver.url)
    feed.add(site.studies["alice-2"], ALICE)
    feed.add(site.studies["bob"], BOB)
    assert once(found) == (0, 0)
    assert found.store.outbox(subscription.id) == []
    assert receiver.received == []


def test_a_subscription_is_told_what_happens_after_it_was_made(site, receiver):
    grant(site)
    feed = Feed()
    found = dispatcher(site, feed, config(receiver.origin))
    feed.add(site.studies["alice-1"], ALICE)
    subscribe(found, receiver.url)
    later = feed.add(site.studies["alice-2"], ALICE)
    once(found)
    assert receiver.acknowledged() == [later.seq]


def test_a_receiver_down_for_a_while_gets_every_event_in_order_none_twice_once_acknowledged(site, receiver):
    grant(site)
    feed = Feed()
    found = dispatcher(site, feed, config(receiver.origin))
    subscribe(found, receiver.url)
    events = [feed.add(site.studies[name], ALICE) for name in ("alice-1", "alice-2") * 3]
    receiver.fail_after = 2  # acknowledges two, then is down
    until(found, lambda: len(receiver.received) >= 8)
    assert receiver.acknowledged() == [e.seq for e in events[:2]]
    receiver.fail_after = None  # back
    until(found, lambda: len(receiver.acknowledged()) == len(events))
    assert receiver.acknowledged() == [e.seq for e in events]
    attempted = [r["seq"] for r in receiver.received]
    assert attempted == sorted(attempted), "order kept per subscriber"
    for index, seq in enumerate(attempted):
        acknowledged_before = {r["seq"] for r in receiver.received[:index] if r["status"] == 200}
        assert seq not in acknowledged_before, f"{seq} sent again after its acknowledgement"
    failures = [r for r in site.records() if r.action == "notify.deliver" and r.outcome == "error"]
    assert failures and all(r.status == 500 and r.patient == ALICE for r in failures)


def test_a_restarted_gateway_carries_on_where_the_last_one_stopped(site, receiver):
    grant(site)
    feed = Feed()
    first = dispatcher(site, feed, config(receiver.origin))
    subscription = subscribe(first, receiver.url)
    events = [feed.add(site.studies[name], ALICE) for name in ("alice-1", "alice-2") * 3]
    receiver.fail_after = 3
    until(first, lambda: len(receiver.received) >= 4)
    # A new process: its own access store, policy and dispatcher on the same databases.
    db = site.access.store.db
    url = f"sqlite:///{db.path}" if db.dialect == "sqlite" else site.access.policy.registry.url
    store = AccessStore(url)
    try:
        policy = Policy(store, site.access.policy.registry)
        audit = AuditLog(store)
        second = Dispatcher(
            SubscriptionStore(store.db), policy, feed, config(receiver.origin), BASE, audit.append
        )
        assert second.store.get(subscription.id) is not None
        receiver.fail_after = None
        until(second, lambda: len(receiver.acknowledged()) == len(events))
        audit.flush()
    finally:
        store.close()
    assert receiver.acknowledged() == [e.seq for e in events]
    assert [r["seq"] for r in receiver.received] == sorted(r["seq"] for r in receiver.received)


def test_a_revoked_grant_stops_delivery_at_once_and_nothing_is_sent(site, receiver):
    granted = grant(site)
    feed = Feed()
    found = dispatcher(site, feed, config(receiver.origin))
    subscription = subscribe(found, receiver.url)
    feed.add(site.studies["alice-1"], ALICE)
    feed.add(site.studies["alice-2"], ALICE)
    receiver.mode = "fail"
    once(found)  # queued while the grant held; the receiver is down
    assert len(receiver.received) == 1
    revoke(site, granted)
    receiver.mode = "ok"
    time.sleep(0.1)  # past the first retry
    once(found)
    assert receiver.acknowledged() == []
    assert [row["state"] for row in found.store.outbox(subscription.id)] == ["withheld", "withheld"]
    denied = [r for r in site.records() if r.action == "notify.deliver" and r.outcome == "denied"]
    assert len(denied) == 2 and all(r.patient == ALICE for r in denied)


def test_a_redirect_is_not_followed(site, receiver):
    grant(site)
    feed = Feed()
    other = type(receiver)()
    try:
        receiver.mode, receiver.location = "redirect", other.url
        found = dispatcher(site, feed, config(receiver.origin, other.origin))
        subscription = subscribe(found, receiver.url)
        feed.add(site.studies["alice-1"], ALICE)
        once(found)
        assert [r["status"] for r in receiver.received] == [302]
        assert other.received == []
        row = found.store.outbox(subscription.id)[0]
        assert row["state"] == "pending" and "redirect" in row["error"]
    finally:
        other.close()


def test_a_hung_receiver_hits_the_deadline(site, receiver):
    grant(site)
    feed = Feed()
    found = dispatcher(site, feed, config(receiver.origin, deadline=0.5))
    subscription = subscribe(found, receiver.url)
    feed.add(site.studies["alice-1"], ALICE)
    receiver.mode = "hang"
    started = time.monotonic()
    once(found)
    assert time.monotonic() - started < 3
    row = found.store.outbox(subscription.id)[0]
    assert row["state"] == "pending" and "within 0.5 s" in row["error"]
    assert [r.status for r in site.records() if r.action == "notify.deliver"] == [504]


def test_an_origin_no_longer_allowed_gets_nothing(site, receiver):
    grant(site)
    feed = Feed()
    found = dispatcher(site, feed, config(receiver.origin))
    subscription = subscribe(found, receiver.url)
    feed.add(site.studies["alice-1"], ALICE)
    found.config = config("https://elsewhere.example:443")
    once(found)
    assert receiver.received == []
    assert found.store.outbox(subscription.id)[0]["state"] == "pending"


def test_two_nodes_at_once_deliver_each_event_once(site, receiver):
    grant(site)
    feed = Feed()
    nodes = [dispatcher(site, feed, config(receiver.origin)) for _ in range(2)]
    subscribe(nodes[0], receiver.url)
    events = [feed.add(site.studies["alice-1"], ALICE) for _ in range(5)]

    async def both() -> None:
        async with anyio.create_task_group() as group:
            for node in nodes:
                group.start_soon(node.run_once)

    for _ in range(3):
        anyio.run(both)
    assert [r["seq"] for r in receiver.received] == [e.seq for e in events]


def test_a_full_payload_carries_a_valid_imaging_study_and_a_removal_none(site, receiver):
    grant(site)
    feed = Feed()
    found = dispatcher(site, feed, config(receiver.origin))
    subscribe(found, receiver.url, payload="full")
    feed.add(site.studies["alice-1"], ALICE)
    feed.add(site.studies["alice-2"], ALICE, kind="study.removed")
    once(found)
    assert len(receiver.acknowledged()) == 2
    available, removed = (r["body"] for r in receiver.received)
    study = ImagingStudy.model_validate(available["entry"][2]["resource"])
    assert study.subject.identifier.value == ALICE
    assert [c.code for c in study.modality] == ["CT"] and study.numberOfInstances == 2
    assert study.endpoint[0].reference == available["entry"][1]["fullUrl"]
    topic = removed["entry"][0]["resource"]["parameter"][1]["valueCanonical"]
    assert topic.endswith("/study-removed") and len(removed["entry"]) == 2


def test_a_woken_worker_passes_at_once_not_after_its_interval(site):
    """The announcer wakes the worker when it announced a study, so an alert does not wait out
    ``[notify] interval`` (here an hour)."""
    import anyio

    from gateway.config import NotifyConfig

    worker = dispatcher(site, Feed(), NotifyConfig(interval=3600.0))
    passes: list[float] = []

    async def counted() -> tuple[int, int]:
        passes.append(time.monotonic())
        return 0, 0

    worker.run_once = counted  # type: ignore[method-assign]

    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(worker.run)
            with anyio.fail_after(5):
                while not passes:
                    await anyio.sleep(0.01)
                worker.wake()
                while len(passes) < 2:
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()

    anyio.run(main)
    assert len(passes) == 2 and passes[1] - passes[0] < 1.0
