"""Rotation policy (auth.rotation): which kid signs and which kids verify at time t."""

from __future__ import annotations

import pytest

from auth.rotation import (
    KeyRecord,
    KeyState,
    key_states,
    retired,
    rotated,
    signing_kid,
    verifying_kids,
)
from edif.clock import FakeClock

A, B, C = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc"
DAY = 86400.0


def _one_key(clock: FakeClock) -> dict[str, KeyRecord]:
    return {A: KeyRecord(kid=A, created_at=clock.now())}


def test_a_single_key_signs_and_verifies():
    clock = FakeClock()
    records = _one_key(clock)
    assert signing_kid(records.values(), clock.now()) == A
    assert key_states(records.values(), clock.now()) == {A: KeyState.ACTIVE}


def test_rotation_switches_signing_and_keeps_the_old_key_for_the_grace_period():
    clock = FakeClock()
    records = _one_key(clock)
    clock.advance(10)
    records = rotated(records, B, clock.now(), grace_s=7 * DAY)

    assert signing_kid(records.values(), clock.now()) == B
    assert key_states(records.values(), clock.now()) == {A: KeyState.GRACE, B: KeyState.ACTIVE}
    assert records[A].superseded_at == clock.now()

    clock.advance(7 * DAY - 1)
    assert verifying_kids(records.values(), clock.now()) == {A, B}
    clock.advance(1)  # the grace period is over: exactly at retire_at
    assert verifying_kids(records.values(), clock.now()) == {B}
    assert key_states(records.values(), clock.now())[A] is KeyState.RETIRED


def test_rotating_again_does_not_extend_a_key_already_in_grace():
    clock = FakeClock()
    records = rotated(_one_key(clock), B, clock.now(), grace_s=DAY)
    deadline_a = records[A].retire_at
    clock.advance(DAY / 2)
    records = rotated(records, C, clock.now(), grace_s=DAY)

    assert records[A].retire_at == deadline_a
    assert records[B].retire_at == clock.now() + DAY
    assert signing_kid(records.values(), clock.now()) == C
    clock.advance(DAY / 2)
    assert verifying_kids(records.values(), clock.now()) == {B, C}


def test_zero_grace_retires_the_old_key_at_once():
    clock = FakeClock()
    records = rotated(_one_key(clock), B, clock.now(), grace_s=0)
    assert verifying_kids(records.values(), clock.now()) == {B}


def test_emergency_retirement_of_a_grace_key():
    clock = FakeClock()
    records = rotated(_one_key(clock), B, clock.now(), grace_s=7 * DAY)
    clock.advance(60)
    records = retired(records, A, clock.now())
    assert verifying_kids(records.values(), clock.now()) == {B}
    assert signing_kid(records.values(), clock.now()) == B


def test_retiring_the_only_key_leaves_nothing_to_sign():
    clock = FakeClock()
    records = retired(_one_key(clock), A, clock.now())
    assert signing_kid(records.values(), clock.now()) is None
    assert verifying_kids(records.values(), clock.now()) == set()
    with pytest.raises(KeyError):
        retired(records, B, clock.now())


def test_legacy_keys_without_dates_sign_by_smallest_kid_and_all_verify():
    records = {kid: KeyRecord(kid=kid, created_at=0.0) for kid in (C, A, B)}
    assert signing_kid(records.values(), 1e9) == A
    assert verifying_kids(records.values(), 1e9) == {A, B, C}
    assert key_states(records.values(), 1e9)[B] is KeyState.GRACE


def test_a_clock_that_went_back_still_makes_the_new_key_sign():
    clock = FakeClock()
    records = _one_key(clock)
    clock.advance(-3600)
    records = rotated(records, B, clock.now(), grace_s=DAY)
    assert signing_kid(records.values(), clock.now()) == B


def test_rotation_refuses_a_duplicate_kid_and_negative_grace():
    clock = FakeClock()
    with pytest.raises(ValueError):
        rotated(_one_key(clock), A, clock.now(), grace_s=1)
    with pytest.raises(ValueError):
        rotated(_one_key(clock), B, clock.now(), grace_s=-1)
