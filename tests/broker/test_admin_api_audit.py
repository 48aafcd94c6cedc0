"""Quota changes through the JSON admin API (what `edif quota set|delete` uses) are audited."""

from __future__ import annotations

import logging

import pytest
from broker_fakes import FakeAuthenticator, FakeIdentity, settings_for
from fastapi.testclient import TestClient

from broker.admin_api import add_admin_api_routes
from broker.app import create_app
from broker.audit import AuditAction, AuditFilter, open_audit_log
from broker.main import lifespan_for
from broker.quotas.policy import QuotaPolicy
from broker.quotas.service import QuotaService
from broker.quotas.store import QuotaStore

STAFF_SUB = "gov-officer@example.org"
STAFF = {"ndif-api-key": "staff-token"}


class Authenticator(FakeAuthenticator):
    TOKENS = {**FakeAuthenticator.TOKENS, "staff-token": FakeIdentity(STAFF_SUB, "governance")}


class BrokenAudit:
    def append(self, event):
        raise OSError("disk full")


@pytest.fixture
def build(tmp_path, make_service, clock):
    opened: list[TestClient] = []

    def make(audit) -> tuple[TestClient, QuotaService]:
        settings = settings_for(tmp_path)
        service = make_service()
        quotas = QuotaService(
            QuotaStore(tmp_path / "quotas.sqlite3"), lambda sub: "u-x", clock, QuotaPolicy()
        )
        auth = Authenticator()
        app = create_app(service, auth, settings, lambda: {"keys": []}, lifespan_for(service))
        add_admin_api_routes(app, quotas, auth, audit)
        client = TestClient(app, base_url="http://broker.test")
        client.__enter__()
        opened.append(client)
        return client, quotas

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def test_set_and_delete_write_quota_change_entries(tmp_path, build, clock) -> None:
    audit = open_audit_log(tmp_path / "audit-data", tmp_path / "keys", None, clock)
    client, _ = build(audit)
    reply = client.put("/admin/api/quotas/group/lab-a", json={"max_concurrent": 2}, headers=STAFF)
    assert reply.status_code == 200, reply.text
    assert client.delete("/admin/api/quotas/group/lab-a", headers=STAFF).status_code == 200
    refused = client.put(
        "/admin/api/quotas/group/lab-b", json={"burst": 1}, headers={"ndif-api-key": "bob-token"}
    )
    assert refused.status_code == 403  # not staff: no change, nothing audited

    entries = audit.entries(AuditFilter(actions=frozenset({AuditAction.QUOTA_CHANGE.value})))
    assert [e.data["name"] for e in entries] == ["lab-a", "lab-a"]
    set_entry, delete_entry = entries
    assert set_entry.data["scope"] == "group"
    assert set_entry.data["policy"]["max_concurrent"] == 2
    assert delete_entry.data["policy"] is None
    assert {e.role for e in entries} == {"governance"}
    assert set_entry.pseudonym and set_entry.pseudonym.startswith("a-")
    assert set_entry.pseudonym == delete_entry.pseudonym  # the same staff member
    assert audit.verify().ok
    audit.close()
    stored = b"".join(p.read_bytes() for p in (tmp_path / "audit-data").rglob("*") if p.is_file())
    assert STAFF_SUB.encode() not in stored and b"staff-token" not in stored


def test_a_failing_audit_log_does_not_undo_the_change(build, caplog) -> None:
    client, quotas = build(BrokenAudit())
    with caplog.at_level(logging.ERROR, logger="broker.admin_api"):
        reply = client.put("/admin/api/quotas/role/researcher", json={"burst": 7}, headers=STAFF)
    assert reply.status_code == 200, reply.text
    assert quotas.policies().roles["researcher"].burst == 7
    assert "could not audit quota change role/researcher" in caplog.text
