"""QuotaService over a temporary SQLite store: admit/release/charge, persistence, pools."""

from __future__ import annotations

import sqlite3

import pytest
from broker_fakes import FakeIdentity

from broker.quotas.policy import Period, PolicyUpdate, QuotaPolicy, Scope
from broker.quotas.service import QuotaService
from broker.quotas.store import QuotaStore
from edif.clock import FakeClock
from edif.errors import NotFound, PayloadTooLarge, QuotaExceeded

ALICE = FakeIdentity("alice@example.org", "researcher", ("lab-a",))
ALICE2 = FakeIdentity("carol@example.org", "researcher", ("lab-a",))
BOB = FakeIdentity("bob@example.org", "researcher")


def pseudo(sub: str) -> str:
    return "u-" + sub.split("@")[0]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_quotas(tmp_path, clock):
    def build(**defaults) -> QuotaService:
        store = QuotaStore(tmp_path / "quotas.sqlite3")
        return QuotaService(store, pseudo, clock, QuotaPolicy(**defaults))

    return build


def test_concurrency_slots_are_taken_and_released(make_quotas) -> None:
    quotas = make_quotas(max_concurrent=2)
    first, _ = quotas.admit(ALICE, 10), quotas.admit(ALICE, 10)
    with pytest.raises(QuotaExceeded, match="you have 2 unfinished job.s., the limit is 2"):
        quotas.admit(ALICE, 10)
    quotas.admit(BOB, 10)  # per user
    quotas.release(first)
    quotas.release(first)  # idempotent: a double release frees nothing extra
    quotas.admit(ALICE, 10)
    with pytest.raises(QuotaExceeded):
        quotas.admit(ALICE, 10)


def test_rate_limit_refuses_with_retry_after_and_refills(make_quotas, clock) -> None:
    quotas = make_quotas(rate_per_s=0.5, burst=2)
    for _ in range(2):
        quotas.release(quotas.admit(ALICE, 1))
    with pytest.raises(QuotaExceeded) as info:
        quotas.admit(ALICE, 1)
    assert "request rate: you used all 2 requests of your burst" in info.value.message
    assert "refilled at 0.5 per second" in info.value.message
    assert "allowed in 2.00 s" in info.value.message
    clock.advance(2.0)
    quotas.admit(ALICE, 1)


def test_payload_cap_is_413(make_quotas) -> None:
    quotas = make_quotas(max_payload_bytes=100)
    with pytest.raises(PayloadTooLarge, match="this request is 101 bytes, your limit is 100"):
        quotas.admit(ALICE, 101)
    quotas.admit(ALICE, 100)


def test_budget_admits_under_limit_and_refuses_after_the_charge(make_quotas, clock) -> None:
    quotas = make_quotas()
    quotas.set_policy(Scope.GROUP, "lab-a", PolicyUpdate(gpu_seconds_per_period=1.0))
    ticket = quotas.admit(ALICE, 1)
    quotas.release(ticket)
    quotas.charge(ticket, 1.5, "job-1")  # the admitted job overshoots; it was allowed to finish
    with pytest.raises(QuotaExceeded) as info:
        quotas.admit(ALICE, 1)
    assert "used 1.500 of 1 GPU-seconds" in info.value.message
    assert "resets at" in info.value.message
    quotas.admit(ALICE2, 1)  # a per-user budget: carol is fine
    clock.advance(24 * 3600)  # the next UTC day
    quotas.admit(ALICE, 1)


def test_group_pool_is_shared_by_members(make_quotas) -> None:
    quotas = make_quotas()
    quotas.set_policy(Scope.GROUP, "lab-a", PolicyUpdate(group_gpu_seconds_per_period=2.0))
    quotas.charge(ALICE, 1.0)
    quotas.charge(ALICE2, 1.0)
    with pytest.raises(QuotaExceeded, match=r"budget \(group lab-a, per day\): used 2.000 of 2"):
        quotas.admit(ALICE, 1)
    quotas.admit(BOB, 1)


def test_usage_is_keyed_by_pseudonym_and_group(make_quotas, tmp_path) -> None:
    quotas = make_quotas()
    ticket = quotas.admit(ALICE, 1)
    quotas.charge(ticket, 0.25, "job-1")
    quotas.charge(BOB, 1.0)
    report = quotas.usage(Period.DAY)
    rows = {(r.scope, r.name): (r.gpu_seconds, r.jobs) for r in report.rows}
    assert rows == {
        ("user", "u-alice"): (0.25, 1),
        ("group", "lab-a"): (0.25, 1),
        ("user", "u-bob"): (1.0, 1),
    }
    assert report.active_jobs == {"u-alice": 1}
    # the raw sub is nowhere in the database
    with sqlite3.connect(tmp_path / "quotas.sqlite3") as db:
        dump = "\n".join(db.iterdump())
    assert "alice@example.org" not in dump and "bob@example.org" not in dump


def test_policies_survive_a_restart(make_quotas, tmp_path) -> None:
    quotas = make_quotas()
    quotas.set_policy(Scope.ROLE, "researcher", PolicyUpdate(burst=3))
    quotas.set_policy(Scope.GROUP, "lab-a", PolicyUpdate(gpu_seconds_per_period=7, period="week"))
    quotas.charge(ALICE, 2.0)
    again = make_quotas()
    assert again.policies().roles["researcher"].burst == 3
    assert again.policies().groups["lab-a"].period is Period.WEEK
    assert again.policy_for(ALICE).gpu_seconds_per_period == 7
    assert again.used("user", "u-alice", Period.WEEK) == 2.0
    with sqlite3.connect(tmp_path / "quotas.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_delete_policy(make_quotas) -> None:
    quotas = make_quotas()
    quotas.set_policy(Scope.GROUP, "lab-a", PolicyUpdate(max_concurrent=1))
    quotas.delete_policy(Scope.GROUP, "lab-a")
    assert quotas.policy_for(ALICE) == quotas.policies().defaults
    with pytest.raises(NotFound):
        quotas.delete_policy(Scope.GROUP, "lab-a")
    assert make_quotas().policies().groups == {}
