"""Subscriptions and the outbox in the access database: the migration from the previous version,
the outbox's idempotence; and the ``[notify]`` configuration."""

from __future__ import annotations

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
        assert store.db.schema_version() == 3
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
