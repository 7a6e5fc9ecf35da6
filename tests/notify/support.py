"""What the notify tests share: a feed the tests write to, a dispatcher over the access suite's
site, subscriptions, grants, and passes of the worker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from gateway.config import NotifyConfig
from gateway.notify.dispatch import Dispatcher
from gateway.notify.store import Subscription, SubscriptionStore
from gateway.types import Change
from tests.access.conftest import ALICE, BOB, PORTAL, PSC, Site

__all__ = ["ALICE", "BOB", "BASE", "Feed", "config", "dispatcher", "subscribe", "grant", "revoke", "doctor"]

BASE = "https://gateway.example"


@dataclass
class Feed:
    """The change feed as the dispatcher reads it, written by the test."""

    events: list[Change] = field(default_factory=list)

    def add(self, study: str, patient: str | None, kind: str = "study.available") -> Change:
        change = Change(len(self.events) + 1, time.time(), kind, "", study, None, patient, 2)
        self.events.append(change)
        return change

    def __call__(self, since: int, limit: int) -> list[Change]:
        return [c for c in self.events if c.seq > since][:limit]


def config(*origins: str, deadline: float = 2.0) -> NotifyConfig:
    return NotifyConfig(allowed_origins=origins, deadline=deadline, first_retry=0.05, max_backoff=0.2)


def dispatcher(site: Site, feed: Feed, settings: NotifyConfig) -> Dispatcher:
    store = SubscriptionStore(site.access.store.db)
    return Dispatcher(store, site.access.policy, feed, settings, BASE, site.access.audit.append)


def subscribe(
    found: Dispatcher, endpoint: str, channel: str = "rest-hook", patient: str | None = None, **extra: Any
) -> Subscription:
    fields: dict[str, Any] = {"issuer": PSC, "subject": "10001", "role": "professional"}
    fields["organization"] = "750000001"
    fields |= {"patient": patient, "channel": channel, "endpoint": endpoint, "header": None}
    fields |= {"payload": "id-only", "cursor": found.head()} | extra
    return found.store.add(**fields)


def grant(site: Site, ins: str = ALICE) -> str:
    token = site.token(PORTAL, sub=f"patient-{ins}", ins=ins)
    made = site.post("/api/grants", {"grantee": "10001"}, token)
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def revoke(site: Site, grant_id: str, ins: str = ALICE) -> None:
    token = site.token(PORTAL, sub=f"patient-{ins}", ins=ins)
    assert site.delete(f"/api/grants/{grant_id}", token).status_code == 204


def doctor(site: Site, rpps: str = "10001") -> str:
    return site.token(PSC, sub=rpps, organization="750000001", roles=["radiologist"])


def once(found: Dispatcher) -> tuple[int, int]:
    return anyio.run(found.run_once)


def until(found: Dispatcher, done: Any, seconds: float = 10.0) -> None:
    """Passes until ``done()`` holds, within ``seconds``."""
    stop = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < stop, "not done in time"
        once(found)
        time.sleep(0.02)
