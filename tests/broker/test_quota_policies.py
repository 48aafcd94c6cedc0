"""Quota policies as pure functions: token bucket, budget periods, admit/deny, precedence."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.quotas import budget, caps
from broker.quotas.bucket import take
from broker.quotas.policy import Period, PolicySet, PolicyUpdate, QuotaPolicy, group_pools, resolve
from edif.clock import FakeClock
from edif.errors import PayloadTooLarge, QuotaExceeded


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# -- token bucket ----------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_refuses_with_retry_after() -> None:
    clock = FakeClock()
    state = None
    for _ in range(3):
        allowed, state, retry = take(state, clock.monotonic(), rate=2.0, burst=3)
        assert allowed and retry == 0.0
    allowed, state, retry = take(state, clock.monotonic(), rate=2.0, burst=3)
    assert not allowed
    assert retry == pytest.approx(0.5)  # one token at 2/s


def test_bucket_refills_at_rate_and_never_beyond_burst() -> None:
    clock = FakeClock()
    state = None
    for _ in range(2):
        _, state, _ = take(state, clock.monotonic(), rate=1.0, burst=2)
    clock.advance(0.5)
    allowed, state, retry = take(state, clock.monotonic(), rate=1.0, burst=2)
    assert not allowed and retry == pytest.approx(0.5)
    clock.advance(0.5)
    allowed, state, _ = take(state, clock.monotonic(), rate=1.0, burst=2)
    assert allowed
    clock.advance(3600)  # a long pause refills to the burst, not more
    results = []
    for _ in range(3):
        allowed, state, _ = take(state, clock.monotonic(), rate=1.0, burst=2)
        results.append(allowed)
    assert results == [True, True, False]


def test_bucket_ignores_a_clock_that_goes_back() -> None:
    _, state, _ = take(None, 100.0, rate=1.0, burst=1)
    allowed, state, _ = take(state, 50.0, rate=1.0, burst=1)
    assert not allowed and state.tokens == pytest.approx(0.0)


# -- budget periods --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "period", "start", "end"),
    [
        ("2026-11-26T13:05:00", Period.DAY, "2026-11-26T00:00:00", "2026-11-27T00:00:00"),
        ("2026-11-26T23:59:59", Period.DAY, "2026-11-26T00:00:00", "2026-11-27T00:00:00"),
        ("2026-11-27T00:00:00", Period.DAY, "2026-11-27T00:00:00", "2026-11-28T00:00:00"),
        # 2026-11-26 is a Thursday; weeks start on Monday
        ("2026-11-26T13:05:00", Period.WEEK, "2026-11-23T00:00:00", "2026-11-30T00:00:00"),
        ("2026-11-30T00:00:00", Period.WEEK, "2026-11-30T00:00:00", "2026-12-07T00:00:00"),
        ("2026-11-26T13:05:00", Period.MONTH, "2026-11-01T00:00:00", "2026-12-01T00:00:00"),
        ("2026-12-31T23:00:00", Period.MONTH, "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("2028-02-29T12:00:00", Period.MONTH, "2028-02-01T00:00:00", "2028-03-01T00:00:00"),
    ],
)
def test_period_boundaries_are_utc_calendar_periods(at, period, start, end) -> None:
    assert budget.period_of(ts(at), period) == (ts(start), ts(end))


def test_budget_admits_while_anything_is_left_and_reports_remaining() -> None:
    assert budget.admit(0.0, 10.0)
    assert budget.admit(9.99, 10.0)
    assert not budget.admit(10.0, 10.0)
    assert not budget.admit(12.5, 10.0)  # an admitted job may overshoot; the next waits
    assert budget.admit(1e9, None)
    assert budget.remaining(3.0, 10.0) == 7.0
    assert budget.remaining(12.0, 10.0) == 0.0
    assert budget.remaining(12.0, None) is None


def test_budget_refusal_names_use_limit_and_reset() -> None:
    now = ts("2026-11-26T13:05:00")
    budget.check(1.0, 2.0, Period.DAY, now, "yours")
    with pytest.raises(QuotaExceeded) as info:
        budget.check(2.5, 2.0, Period.WEEK, now, "yours")
    message = info.value.message
    assert "GPU-seconds budget (yours, per week)" in message
    assert "used 2.500 of 2 GPU-seconds" in message
    assert "resets at 2026-11-30 00:00 UTC" in message
    assert info.value.http_status == 429
    assert info.value.grpc_code == "RESOURCE_EXHAUSTED"


# -- caps ------------------------------------------------------------------------------------


def test_caps() -> None:
    caps.check_concurrent(1, 2)
    with pytest.raises(QuotaExceeded, match="concurrent jobs: you have 2 unfinished job.s., the"):
        caps.check_concurrent(2, 2)
    caps.check_payload(100, 100)
    with pytest.raises(PayloadTooLarge, match="this request is 101 bytes, your limit is 100"):
        caps.check_payload(101, 100)
    caps.check_result(100, 100)
    with pytest.raises(QuotaExceeded, match="result is at least 101 bytes, your limit is 100"):
        caps.check_result(101, 100)


# -- precedence ------------------------------------------------------------------------------

STRICT = QuotaPolicy(rate_per_s=1, burst=1, max_concurrent=1, gpu_seconds_per_period=10)
ROLE = QuotaPolicy(rate_per_s=5, burst=5, max_concurrent=4, gpu_seconds_per_period=100)
BIG = QuotaPolicy(max_concurrent=8, gpu_seconds_per_period=1000, period=Period.MONTH)


def test_defaults_apply_when_nothing_matches() -> None:
    policies = PolicySet(defaults=QuotaPolicy(burst=7))
    assert resolve(policies, "researcher", ["lab"]).burst == 7


def test_role_policy_beats_defaults() -> None:
    policies = PolicySet(roles={"researcher": ROLE})
    assert resolve(policies, "researcher", ()) == ROLE
    assert resolve(policies, "admin", ()) == policies.defaults


def test_group_policy_beats_role_policy_even_when_stricter() -> None:
    policies = PolicySet(roles={"researcher": ROLE}, groups={"course": STRICT})
    assert resolve(policies, "researcher", ["course"]) == STRICT
    assert resolve(policies, "researcher", ["other"]) == ROLE


def test_several_group_policies_give_the_most_generous_of_each_limit() -> None:
    policies = PolicySet(groups={"course": STRICT, "project": BIG})
    merged = resolve(policies, "researcher", ["course", "project"])
    assert merged.max_concurrent == 8
    assert merged.rate_per_s == BIG.rate_per_s
    assert (merged.gpu_seconds_per_period, merged.period) == (1000, Period.MONTH)
    unlimited = PolicySet(groups={"course": STRICT, "staff": QuotaPolicy()})
    assert resolve(unlimited, "researcher", ["course", "staff"]).gpu_seconds_per_period is None


def test_group_pools_are_the_groups_with_a_shared_budget() -> None:
    pooled = QuotaPolicy(group_gpu_seconds_per_period=50)
    groups = {"a": pooled, "b": QuotaPolicy()}
    assert group_pools(groups, ["a", "b", "c"]) == {"a": pooled}


def test_policy_update_keeps_fields_left_out_and_can_clear_a_budget() -> None:
    base = QuotaPolicy(burst=3, gpu_seconds_per_period=5)
    updated = PolicyUpdate(gpu_seconds_per_period=9, period=Period.WEEK).apply_to(base)
    assert (updated.burst, updated.gpu_seconds_per_period, updated.period) == (3, 9, Period.WEEK)
    assert PolicyUpdate(unlimited_gpu_seconds=True).apply_to(base).gpu_seconds_per_period is None
