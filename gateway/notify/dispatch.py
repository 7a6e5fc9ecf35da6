"""Delivery: the change feed fanned out into the outbox, the outbox delivered to each subscriber.

One pass (``run_once``), by one node at a time (an exclusive section of the access database: a
lock file beside SQLite, an advisory lock on PostgreSQL; the other nodes skip the pass):

1. **Fan-out.** The feed is read from the oldest cursor of the active subscriptions; each
   study-level event (``study.available``, ``study.updated``, ``study.removed``) is queued for
   each subscription whose scope holds its patient and whose owner the policy lets see it (a
   grant from the patient: ``Policy.check_study``, or ``check_patient`` for a study gone from the
   index; hidden studies never; emergency access does not feed a subscription). Rows and cursors
   move in one transaction, rows unique per (subscription, seq): a pass cut short repeats
   nothing.
2. **Delivery.** For each subscription, only its oldest pending row is attempted, and the next
   one only once that one is acknowledged: order per subscriber. Subscriptions are served
   concurrently. Consent is checked again first: a grant revoked since the fan-out withholds the
   row (nothing sent, audited as denied). A failed attempt is retried after ``first_retry``
   seconds, doubling up to ``max_backoff``: a receiver down for an hour gets everything, in
   order, within ``max_backoff`` of its return. Every attempt is audited (``notify.deliver``,
   naming the patient and the outcome).

All of it is in the database: a restarted gateway (or another node) carries on. Delivery is at
least once: a crash between a receiver's acknowledgement and its recording sends that one event
again (its event number and MSH-10 say so); an acknowledged event is never sent again.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx

from gateway.access.audit_record import AuditRecord
from gateway.access.identity import Principal
from gateway.access.policy import Policy
from gateway.config import NotifyConfig, notify_origin
from gateway.errors import Forbidden, GatewayError, NotFound, Unauthenticated
from gateway.notify import mllp
from gateway.notify.resthook import Notice, Outcome, notification_body, post_notification
from gateway.notify.store import Pending, Subscription, SubscriptionStore
from gateway.types import Change, Match, Query

__all__ = ["Dispatcher", "Feed", "STUDY_KINDS", "owner"]

log = logging.getLogger("gateway.notify")

Feed = Callable[[int, int], list[Change]]  # (since, limit) -> events with seq > since, in order
STUDY_KINDS = ("study.available", "study.updated", "study.removed")
_PAGE = 1000  # feed events read at once
_PAGES = 20  # pages fanned out per pass at most (the next pass goes on)
_PER_SUBSCRIPTION = 100  # rows delivered to one subscriber per pass at most
_CONCURRENCY = 32  # subscribers served at once
_THREADS = 8  # worker threads for the dispatcher's database calls


def owner(subscription: Subscription, namespaces: Mapping[str, str | None] | None = None) -> Principal:
    """The principal a subscription acts for: its owner as they were when subscribing. A system
    client's organization is named as its issuer's configuration says now (``namespaces``:
    issuer -> ``organizations_of``), so an operator who withdraws that trust stops its events."""
    return Principal(
        role=subscription.role,
        actor=subscription.subject,
        issuer=subscription.issuer,
        organization=subscription.organization,
        namespace=(namespaces or {}).get(subscription.issuer or "")
        if subscription.role == "system"
        else None,
    )


class Dispatcher:
    def __init__(
        self,
        store: SubscriptionStore,
        policy: Policy,
        feed: Feed | None,
        config: NotifyConfig,
        base_url: str,
        audit: Callable[[AuditRecord], None],
        last: Callable[[], int] | None = None,
        namespaces: Mapping[str, str | None] | None = None,
    ) -> None:
        """``feed``: the change feed (``Registry.changes``); None: nothing is fanned out (what is
        already queued is still delivered). ``audit``: where each attempt's record goes.
        ``last``: the feed's greatest seq (``Registry.last_change``), else read to its end.
        ``namespaces``: each issuer's ``organizations_of`` (system clients' subscriptions)."""
        self.store = store
        self.policy = policy
        self.feed = feed
        self.config = config
        self.base_url = base_url
        self.audit = audit
        self.last = last
        self.namespaces = dict(namespaces or {})
        self._woken: anyio.Event | None = None  # set by ``wake`` while ``run`` waits
        self._limiter = anyio.CapacityLimiter(_THREADS)
        # Outbox writes one at a time: SQLite serialises writers anyway, and its busy handler
        # makes concurrent ones sleep (measured: 3x fewer deliveries per second).
        self._writer = anyio.CapacityLimiter(1)

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)

    async def _write(self, function: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(function, *args, limiter=self._writer)

    # -- the worker --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Passes every ``config.interval`` seconds until cancelled, and at once when woken
        (``wake``: this node announced a study), so an alert does not wait out the interval."""
        self._woken = anyio.Event()
        while True:
            try:
                await self.run_once()
            except GatewayError as exc:
                log.warning("notify: pass failed (%s); trying again", exc.message)
            except Exception:  # the worker outlives any one pass: the outbox keeps what is owed
                log.exception("notify: pass failed; trying again")
            with anyio.move_on_after(self.config.interval):
                await self._woken.wait()
            self._woken = anyio.Event()

    def wake(self) -> None:
        """Start the next pass now (called on the event loop, by the announcer)."""
        if self._woken is not None:
            self._woken.set()

    async def run_once(self) -> tuple[int, int]:
        """One pass if no other node is in one: (rows queued, attempts made)."""
        stack = contextlib.ExitStack()
        held = await self._run(lambda: stack.enter_context(self.store.exclusive()))
        try:
            if not held:
                return 0, 0
            queued = await self._run(self.fan_out)
            attempts = await self.deliver()
            return queued, attempts
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled pass (shutdown) still lets go
                await self._run(stack.close)

    # -- fan-out -----------------------------------------------------------------------------------

    def head(self) -> int:
        """The feed's last seq: where a new subscription starts (it is told what happens next)."""
        if self.last is not None:
            return self.last()
        position = self.store.max_cursor()
        while self.feed is not None:
            page = self.feed(position, _PAGE)
            if not page:
                break
            position = page[-1].seq
        return position

    def fan_out(self) -> int:
        """Queue the feed's new events for the subscriptions they concern; returns rows queued."""
        subscriptions = self.store.active()
        if self.feed is None or not subscriptions:
            return 0
        cursors = {s.id: s.cursor for s in subscriptions}
        since, queued = min(cursors.values()), 0
        for _ in range(_PAGES):
            changes = self.feed(since, _PAGE)
            if not changes:
                break
            rows = []
            for subscription in subscriptions:
                for change in changes:
                    if change.seq > cursors[subscription.id] and self.may_see(subscription, change):
                        rows.append(
                            (subscription.id, change.seq, change.kind, change.StudyInstanceUID)
                            + (change.patient, change.time)
                        )
            last = changes[-1].seq
            moved = {sid: last for sid, cursor in cursors.items() if cursor < last}
            self.store.enqueue(moved, rows)
            cursors.update(moved)
            since, queued = last, queued + len(rows)
            if len(changes) < _PAGE:
                break
        return queued

    def may_see(self, subscription: Subscription, change: Change | Pending) -> bool:
        """Does the subscription's scope hold the event, and may its owner see it now?"""
        if change.kind not in STUDY_KINDS or change.patient is None:
            return False  # consent is given per INS: none can cover a study without one
        if subscription.patient is not None and change.patient != subscription.patient:
            return False
        principal = owner(subscription, self.namespaces)
        try:
            if change.kind == "study.removed":  # gone from the index: the patient's grant decides
                if self.policy.store.is_hidden(change.StudyInstanceUID):
                    return False
                decision = self.policy.check_patient(principal, change.patient)
            else:
                decision = self.policy.check_study(principal, change.StudyInstanceUID)
        except (Forbidden, NotFound, Unauthenticated):  # the policy's refusals; a failing database
            return False  # raises instead: nothing is withheld for want of an answer
        return not decision.emergency and decision.patient == change.patient

    # -- delivery ----------------------------------------------------------------------------------

    async def deliver(self) -> int:
        """Attempt what is due, each subscriber's rows in order; returns attempts made."""
        subscriptions = {s.id: s for s in await self._run(self.store.active)}
        pending = await self._run(self.store.oldest_pending, list(subscriptions), _PER_SUBSCRIPTION)
        now, counted = time.time(), [0]
        semaphore = anyio.Semaphore(_CONCURRENCY)
        limits = httpx.Limits(max_connections=_CONCURRENCY, max_keepalive_connections=_CONCURRENCY)
        async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
            async with anyio.create_task_group() as group:
                for sid, rows in pending.items():
                    if rows and rows[0].due <= now:
                        group.start_soon(self._drain, client, semaphore, subscriptions[sid], rows, counted)
        return counted[0]

    async def _drain(
        self,
        client: httpx.AsyncClient,
        semaphore: anyio.Semaphore,
        subscription: Subscription,
        rows: list[Pending],
        counted: list[int],
    ) -> None:
        async with semaphore:
            for row in rows:
                if row.due > time.time():
                    return
                counted[0] += 1
                if not await self._attempt(client, subscription, row):
                    return  # the next row waits for this one: order per subscriber

    async def _attempt(self, client: httpx.AsyncClient, subscription: Subscription, row: Pending) -> bool:
        """One delivery attempt of ``row``; True when it is settled (acknowledged or withheld)."""
        started = time.time()
        origin = notify_origin(subscription.endpoint) or "?"
        if not await self._run(self.may_see, subscription, row):
            await self._write(self.store.settle, row.id, "withheld", "consent no longer holds")
            self._audit(subscription, row, origin, started, Outcome(False, 403, "consent no longer holds"))
            return True
        if origin not in self.config.allowed_origins:
            outcome = Outcome(False, 403, f"{origin} is no longer among notify.allowed_origins")
        else:
            notice = await self._notice(subscription, row)
            outcome = await self._send(client, subscription, notice)
        if outcome.ok:
            await self._write(self.store.settle, row.id, "delivered")
        else:
            wait = min(self.config.max_backoff, self.config.first_retry * 2.0 ** min(row.attempts, 30))
            await self._write(self.store.retry_later, row.id, time.time() + wait, outcome.error or "failed")
        self._audit(subscription, row, origin, started, outcome)
        return outcome.ok

    async def _notice(self, subscription: Subscription, row: Pending) -> Notice:
        study: dict[str, Any] = {}
        if subscription.channel == "mllp" or subscription.payload == "full":
            study = await self._run(self.describe, row.StudyInstanceUID)
        return Notice(
            subscription=subscription.id,
            seq=row.seq,
            kind=row.kind,
            time=row.time,
            StudyInstanceUID=row.StudyInstanceUID,
            patient=row.patient,
            base_url=self.base_url,
            payload=subscription.payload,
            study=study,
        )

    async def _send(self, client: httpx.AsyncClient, subscription: Subscription, notice: Notice) -> Outcome:
        deadline = self.config.deadline
        if subscription.channel == "mllp":
            parts = urlsplit(subscription.endpoint)
            return await mllp.send(parts.hostname or "", parts.port or 0, mllp.oru_r01(notice), deadline)
        body = notification_body(notice)
        return await post_notification(client, subscription.endpoint, body, subscription.header, deadline)

    def describe(self, study: str) -> dict[str, Any]:
        """The study's QIDO columns (accession, date, modalities, counts), {} once it is gone."""
        query = Query(
            level="study", matches=(Match("StudyInstanceUID", "single", (study,)),), include_all=True
        )
        try:
            rows, _ = self.policy.registry.search(query)
        except GatewayError:
            return {}
        return {key: rows[0][key] for key in rows[0].keys()} if rows else {}

    def _audit(
        self, subscription: Subscription, row: Pending, origin: str, started: float, outcome: Outcome
    ) -> None:
        result = "success" if outcome.ok else "denied" if outcome.status == 403 else "error"
        self.audit(
            AuditRecord(
                time=started,
                request_id=secrets.token_hex(8),
                actor=subscription.subject,
                issuer=subscription.issuer,
                role=subscription.role,
                action="notify.deliver",
                outcome=result,
                status=outcome.status,
                patient=row.patient,
                study=row.StudyInstanceUID,
                organization=subscription.organization,
                reason=outcome.error,
                source=subscription.channel,
                bytes_sent=outcome.sent,
                client=origin,
                path=f"/api/subscriptions/{subscription.id}",
                ended=time.time(),
            )
        )
