"""The fair-share policy: decay arithmetic with a fake clock, and the order of waiting jobs."""

from __future__ import annotations

import math

import pytest

from broker.fairshare.policy import (
    ORDERS,
    DecayedUsage,
    Waiting,
    arrival_order,
    decayed,
    priority_order,
)
from edif.clock import FakeClock

HOUR = 3600.0


def test_decay_halves_per_half_life() -> None:
    assert decayed(8.0, 0.0, HOUR) == 8.0
    assert decayed(8.0, HOUR, HOUR) == pytest.approx(4.0)
    assert decayed(8.0, 3 * HOUR, HOUR) == pytest.approx(1.0)
    assert decayed(8.0, HOUR / 2, HOUR) == pytest.approx(8.0 / math.sqrt(2))
    assert decayed(8.0, -5.0, HOUR) == 8.0  # a clock that went back decays nothing


def test_usage_is_charged_and_decays_with_the_clock() -> None:
    clock = FakeClock()
    usage = DecayedUsage(HOUR, clock)
    assert usage.usage("u-a") == 0.0
    usage.charge("u-a", 10.0)
    assert usage.usage("u-a") == pytest.approx(10.0)
    clock.advance(HOUR)
    assert usage.usage("u-a") == pytest.approx(5.0)
    usage.charge("u-a", 3.0)  # 5 (decayed) + 3
    assert usage.usage("u-a") == pytest.approx(8.0)
    clock.advance(2 * HOUR)
    assert usage.usage("u-a") == pytest.approx(2.0)


def test_usage_is_the_sum_of_each_charge_decayed_from_its_own_time() -> None:
    clock = FakeClock()
    usage = DecayedUsage(100.0, clock)
    charges = [(0.0, 4.0), (30.0, 1.5), (75.0, 9.0), (160.0, 0.25)]
    at = 0.0
    for when, gpu_s in charges:
        clock.advance(when - at)
        at = when
        usage.charge("u-a", gpu_s)
    clock.advance(200.0 - at)
    expected = sum(gpu_s * 0.5 ** ((200.0 - when) / 100.0) for when, gpu_s in charges)
    assert usage.usage("u-a") == pytest.approx(expected)


def test_nothing_is_charged_for_no_use_and_forgotten_users_are_dropped() -> None:
    clock = FakeClock()
    usage = DecayedUsage(1.0, clock)
    usage.charge("u-a", 0.0)
    usage.charge("u-b", -3.0)
    usage.charge("u-c", 1.0)
    assert usage.snapshot() == {"u-c": pytest.approx(1.0)}
    clock.advance(60.0)  # 60 half-lives: 1e-18 GPU-seconds is nothing
    assert usage.snapshot() == {}
    assert usage.usage("u-c") == 0.0


def test_half_life_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        DecayedUsage(0.0, FakeClock())


def test_lowest_usage_goes_first_ties_by_arrival() -> None:
    used = {"heavy": 50.0, "light": 2.0, "new": 0.0}
    waiting = [
        Waiting("h1", "heavy", 0),
        Waiting("h2", "heavy", 1),
        Waiting("l1", "light", 2),
        Waiting("n1", "new", 3),
        Waiting("l2", "light", 4),
        Waiting("n2", "new", 5),
    ]
    order = [w.job_id for w in priority_order(reversed(waiting), used.__getitem__)]
    assert order == ["n1", "n2", "l1", "l2", "h1", "h2"]


def test_order_follows_decay_and_charges() -> None:
    clock = FakeClock()
    usage = DecayedUsage(HOUR, clock)
    usage.charge("heavy", 100.0)
    clock.advance(5 * HOUR)  # heavy: 3.125
    usage.charge("light", 4.0)  # light: 4.0, fresher but smaller at first
    waiting = [Waiting("l", "light", 0), Waiting("h", "heavy", 1)]
    assert [w.job_id for w in priority_order(waiting, usage.usage)] == ["h", "l"]
    clock.advance(HOUR)  # heavy 1.5625, light 2.0: still heavy first
    assert [w.job_id for w in priority_order(waiting, usage.usage)] == ["h", "l"]
    usage.charge("heavy", 1.0)  # heavy 2.5625 > light 2.0
    assert [w.job_id for w in priority_order(waiting, usage.usage)] == ["l", "h"]


def test_usage_is_read_once_per_user_per_ordering() -> None:
    reads: list[str] = []

    def usage(user: str) -> float:
        reads.append(user)
        return 1.0

    priority_order([Waiting(str(i), "u-a" if i % 2 else "u-b", i) for i in range(10)], usage)
    assert sorted(reads) == ["u-a", "u-b"]


def test_arrival_order_ignores_usage() -> None:
    used = {"heavy": 50.0, "light": 0.0}
    waiting = [Waiting("h1", "heavy", 0), Waiting("l1", "light", 1), Waiting("h2", "heavy", 2)]
    order = [w.job_id for w in arrival_order(reversed(waiting), used.__getitem__)]
    assert order == ["h1", "l1", "h2"]
    assert {"usage": priority_order, "arrival": arrival_order} == ORDERS


def test_a_restart_seeds_usage_from_recorded_charges() -> None:
    """Charges from the quota ledger, each decayed by its age, then decaying on as usual."""
    clock = FakeClock()
    now = clock.now()
    usage = DecayedUsage(HOUR, clock)
    usage.seed([("u-a", 8.0, now - HOUR), ("u-a", 2.0, now), ("u-b", 4.0, now - 2 * HOUR)], now)
    usage.seed([("u-c", 0.0, now), ("u-d", -1.0, now)], now)  # nothing used: nothing remembered
    assert usage.usage("u-a") == pytest.approx(4.0 + 2.0)
    assert usage.usage("u-b") == pytest.approx(1.0)
    assert set(usage.snapshot()) == {"u-a", "u-b"}
    clock.advance(HOUR)
    assert usage.usage("u-a") == pytest.approx(3.0)


def test_the_quota_ledger_gives_the_charges_since_a_time(tmp_path) -> None:
    from broker.quotas.store import QuotaStore

    store = QuotaStore(tmp_path / "quotas.sqlite3")
    store.charge([("user", "u-a"), ("group", "fau")], 5.0, at=100.0, job_id="j1")
    store.charge([("user", "u-b")], 2.0, at=200.0, job_id="j2")
    store.charge([("user", "u-a")], 1.0, at=50.0, job_id="j0")
    assert store.charges("user", 60.0) == [("u-a", 5.0, 100.0), ("u-b", 2.0, 200.0)]
    assert store.charges("group", 0.0) == [("fau", 5.0, 100.0)]
    store.close()
