"""The access store across schema versions: a database written by the previous version keeps
everything (grants, links, the audit) when opened by this one."""

from __future__ import annotations

from gateway.access.store import AccessStore, _migrations
from gateway.registry.database import open_database


def test_an_audit_written_before_patients_were_listed_is_found_by_patient_after_the_upgrade(
    tmp_path, registry_urls
):
    url = registry_urls.url(tmp_path / "access.db")
    old = open_database(url, ("StudyInstanceUID",), meta="access_meta")
    old.migrate(_migrations(old.dialect)[:1])  # the first schema, as released
    with old.transaction() as conn:
        conn.execute(
            "INSERT INTO audit (time, request_id, actor, role, action, outcome, status, patient, "
            "emergency, bytes_sent) VALUES (1.0, 'r1', '10001', 'professional', 'retrieve', 'success', "
            "200, 'INS-1', 0, 10)"
        )
        conn.execute("INSERT INTO grants VALUES ('g', 'INS-1', 'pro:10001', 1.0, NULL, NULL)")
    old.close()
    store = AccessStore(url)
    try:
        (record,) = store.audit("INS-1")
        assert record.request_id == "r1" and record.patients == ("INS-1",) and record.ended is None
        assert [grant["id"] for grant in store.grants("INS-1")] == ["g"]
    finally:
        store.close()
