"""Subscriptions and the outbox in the access database: the migrations from the previous versions,
the outbox's idempotence, revocation and retention; and the ``[notify]`` configuration."""

from __future__ import annotations

import time

import pytest

from gateway.access.store import AccessStore, _migrations
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.notify.store import SubscriptionStore
from gateway.registry.database import open_database
from tests.notify.support import ALICE


def test_an_access_database_of_the_previous_version_is_migrated_keeping_its_data(tmp_path, registry_urls):
    url = registry_urls.url(tmp_path / "access.db")
    old = open_database(url, ("StudyInstanceUID",), meta="access_meta")
    assert old.migrate(_migrations(old.dialect)[:2]) == 2
    with old.transaction() as conn:
        conn.execute(
            "INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?)", ("g1", ALICE, "pro:x|1", 1.0, None, None)
        )
    old.close()
    store = AccessStore(url)
    try:
        assert store.db.schema_version() == len(_migrations(store.db.dialect))
        assert [g["id"] for g in store.grants(ALICE)] == ["g1"]
        subscriptions = SubscriptionStore(store.db)
        made = subscriptions.add(
            issuer="https://psc.test/auth", subject="10001", role="professional", organization=None,
            patient=None, channel="rest-hook", endpoint="https://ehr.example/hook", header=None,
            payload="id-only", cursor=3,
        )  # fmt: skip
        row = (made.id, 5, "study.available", "1.2.3", ALICE, 1.0)
        subscriptions.enqueue({made.id: 5}, [row])
        subscriptions.enqueue({made.id: 5}, [row])  # a fan-out repeated after a crash
        assert [r["seq"] for r in subscriptions.outbox(made.id)] == [5]
        found = subscriptions.get(made.id)
        assert found is not None and found.cursor == 5
        assert subscriptions.owned("https://psc.test/auth", "10001") == [found]
        assert subscriptions.owned("https://other.test/auth", "10001") == []  # (issuer, subject)
    finally:
        store.close()


def _config(tmp_path, notify: str):
    (tmp_path / "gateway.toml").write_text(
        f'[registry]\nurl = "sqlite:///{tmp_path}/r.db"\n[auth]\nopen = true\n[notify]\n{notify}\n'
    )
    return load_config(tmp_path / "gateway.toml", env={})


def test_allowed_origins_are_read_with_their_port(tmp_path):
    config = _config(tmp_path, 'allowed_origins = ["https://EHR.example", "mllp://ris.example:2575"]')
    assert config.notify.allowed_origins == ("https://ehr.example:443", "mllp://ris.example:2575")


@pytest.mark.parametrize(
    "origin",
    ["https://ehr.example/path", "mllp://ris.example", "ftp://x.example:21", "https://u:p@x.example"],
)
def test_an_allowed_origin_that_is_not_an_origin_is_refused(tmp_path, origin):
    with pytest.raises(ConfigError, match="notify.allowed_origins"):
        _config(tmp_path, f'allowed_origins = ["{origin}"]')


# -- revocation and retention ------------------------------------------------------------------------

OWNER = ("https://psc.test/auth", "10001")
LONG_AGO = 1_000.0  # a settling time past any retention


@pytest.fixture
def subscriptions(tmp_path, registry_urls):
    store = AccessStore(registry_urls.url(tmp_path / "access.db"))
    yield SubscriptionStore(store.db)
    store.close()


def subscribe(store: SubscriptionStore, cursor: int = 0) -> str:
    made = store.add(
        issuer=OWNER[0], subject=OWNER[1], role="professional", organization=None, patient=None,
        channel="rest-hook", endpoint="https://ehr.example/hook", header=None, payload="id-only",
        cursor=cursor,
    )  # fmt: skip
    return made.id


def queue(store: SubscriptionStore, subscription: str, *seqs: int) -> dict[int, int]:
    """Rows for ``seqs``; their ids by seq."""
    store.enqueue(
        {subscription: max(seqs)}, [(subscription, s, "study.available", "1.2.3", ALICE, 1.0) for s in seqs]
    )
    return {row["seq"]: row["id"] for row in store.outbox(subscription)}


def settled_at(store: SubscriptionStore, row: int, when: float) -> None:
    with store.db.transaction() as conn:
        conn.execute("UPDATE outbox SET done = ? WHERE id = ?", (when, row))


def states(store: SubscriptionStore, subscription: str) -> dict[int, str]:
    return {row["seq"]: row["state"] for row in store.outbox(subscription)}


def test_an_access_database_of_version_3_gets_the_outbox_retention_index_keeping_its_rows(
    tmp_path, registry_urls
):
    url = registry_urls.url(tmp_path / "access.db")
    old = open_database(url, ("StudyInstanceUID",), meta="access_meta")
    assert old.migrate(_migrations(old.dialect)[:3]) == 3
    old.close()
    store = AccessStore(url)
    try:
        subscriptions = SubscriptionStore(store.db)
        made = subscribe(subscriptions)
        queue(subscriptions, made, 7)
        store.close()
        store = AccessStore(url)  # opened again: nothing migrated twice
        assert store.db.schema_version() == 4
        assert [r["seq"] for r in SubscriptionStore(store.db).outbox(made)] == [7]
    finally:
        store.close()


def test_revoking_a_subscription_withholds_what_it_was_still_owed(subscriptions):
    made = subscribe(subscriptions)
    rows = queue(subscriptions, made, 1, 2, 3)
    subscriptions.settle(rows[1], "delivered")
    assert subscriptions.revoke(*OWNER, made)
    assert states(subscriptions, made) == {1: "delivered", 2: "withheld", 3: "withheld"}
    withheld = [r for r in subscriptions.outbox(made) if r["state"] == "withheld"]
    assert all(r["error"] == "subscription revoked" and r["done"] for r in withheld)
    assert subscriptions.oldest_pending([made], 10) == {}
    assert not subscriptions.revoke(*OWNER, made)  # once


def test_pruning_deletes_rows_settled_before_the_cutoff_in_batches_and_keeps_the_rest(subscriptions):
    made = subscribe(subscriptions)
    rows = queue(subscriptions, made, 1, 2, 3, 4, 5, 6)
    for seq in (1, 2, 3):
        subscriptions.settle(rows[seq], "delivered")
        settled_at(subscriptions, rows[seq], LONG_AGO)
    subscriptions.settle(rows[4], "withheld", "consent no longer holds")
    settled_at(subscriptions, rows[4], LONG_AGO)
    subscriptions.settle(rows[5], "delivered")  # just now: kept
    # 6 stays pending, however old its event: only what is settled goes
    assert subscriptions.prune(older_than=LONG_AGO + 1, batch=3) == 4
    assert states(subscriptions, made) == {5: "delivered", 6: "pending"}
    assert subscriptions.prune(older_than=LONG_AGO + 1) == 0
    assert subscriptions.get(made) is not None  # active: kept, whatever its outbox


def test_a_revoked_subscription_goes_once_its_rows_have_gone(subscriptions):
    made = subscribe(subscriptions)
    queue(subscriptions, made, 1)
    assert subscriptions.revoke(*OWNER, made)
    assert subscriptions.prune(older_than=time.time() - 3600) == 0  # revoked too recently
    assert subscriptions.get(made) is not None
    assert subscriptions.prune(older_than=time.time() + 1) == 1  # its withheld row, then itself
    assert subscriptions.get(made) is None


def test_pending_rows_a_fan_out_left_after_the_revocation_are_withheld_by_the_next_pass(subscriptions):
    made = subscribe(subscriptions)
    assert subscriptions.revoke(*OWNER, made)
    queue(subscriptions, made, 4)  # a fan-out that read the subscriptions before the revocation
    assert states(subscriptions, made) == {4: "pending"}
    subscriptions.prune(older_than=LONG_AGO)
    assert states(subscriptions, made) == {4: "withheld"}


def test_the_lowest_cursor_is_that_of_the_active_subscriptions(subscriptions):
    assert subscriptions.lowest_cursor() is None
    behind = subscribe(subscriptions, cursor=3)
    subscribe(subscriptions, cursor=9)
    assert subscriptions.lowest_cursor() == 3
    subscriptions.revoke(*OWNER, behind)
    assert subscriptions.lowest_cursor() == 9


def test_keep_days_is_read_for_the_outbox_and_0_keeps_forever(tmp_path):
    assert _config(tmp_path, "").notify.keep_days == 7.0
    assert _config(tmp_path, "keep_days = 0").notify.keep_days == 0.0
    assert _config(tmp_path, "keep_days = 1.5").notify.keep_days == 1.5
    for wrong in ("keep_days = -1", "keep_days = 100000", 'keep_days = "7"'):
        with pytest.raises(ConfigError, match="notify.keep_days"):
            _config(tmp_path, wrong)
