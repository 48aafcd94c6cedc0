"""Key rotation as pure functions: which key signs and which keys verify at time t.

Every key in a store has a `KeyRecord`: when it was created, and (once a newer key replaced it,
or an operator retired it) the time it stops verifying. Its `KeyState` at time t follows from
the records alone, so the broker, the CLI and tests (with a fake clock) all agree:

- RETIRED: `retire_at` is set and t has reached it: the key neither signs nor verifies and is
  left out of the JWKS;
- ACTIVE: the newest key that is not retired (ties: the smallest kid, which keeps the old
  "first kid signs" rule for stores made before rotation existed): it signs new tokens;
- GRACE: any other live key: it still verifies tokens it signed, until its `retire_at` (a key
  with no `retire_at` only comes from a store adopted from before rotation, and keeps verifying
  until the next rotation gives it a deadline).

`rotated` adds a new key and gives every live key without a deadline one `grace_s` from now;
`retired` retires one key now. Both return new records and never touch the disk (`auth.keys`
does that, under its lock).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class KeyState(StrEnum):
    ACTIVE = "active"  # signs new tokens (and verifies)
    GRACE = "grace"  # verifies tokens it signed before a rotation, until retire_at
    RETIRED = "retired"  # neither signs nor verifies; not in the JWKS


class KeyRecord(BaseModel):
    """What the store remembers of one key (the key itself is its PEM file)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kid: str = Field(pattern=r"^[0-9a-f]{16}$")
    created_at: float
    superseded_at: float | None = None  # when a newer key took over signing
    retire_at: float | None = None  # from then on the key no longer verifies


def _retired(record: KeyRecord, now: float) -> bool:
    return record.retire_at is not None and now >= record.retire_at


def signing_kid(records: Iterable[KeyRecord], now: float) -> str | None:
    """The kid that signs at `now`: the newest live key (smallest kid on a tie), or None."""
    live = [r for r in records if not _retired(r, now)]
    if not live:
        return None
    return min(live, key=lambda r: (-r.created_at, r.kid)).kid


def key_states(records: Iterable[KeyRecord], now: float) -> dict[str, KeyState]:
    """Every key's state at `now`, by kid."""
    records = list(records)
    signer = signing_kid(records, now)
    states = {}
    for record in records:
        if _retired(record, now):
            states[record.kid] = KeyState.RETIRED
        elif record.kid == signer:
            states[record.kid] = KeyState.ACTIVE
        else:
            states[record.kid] = KeyState.GRACE
    return states


def verifying_kids(records: Iterable[KeyRecord], now: float) -> set[str]:
    """The kids whose tokens verify at `now` (active and grace keys)."""
    return {kid for kid, state in key_states(records, now).items() if state != KeyState.RETIRED}


def rotated(
    records: Mapping[str, KeyRecord], new_kid: str, now: float, grace_s: float
) -> dict[str, KeyRecord]:
    """`records` plus a new signing key `new_kid`; live keys get `grace_s` more to verify.

    A key already in grace keeps its (earlier) deadline: rotating twice in a row must not
    extend the life of a key someone wanted gone.
    """
    if grace_s < 0:
        raise ValueError("grace period must not be negative")
    if new_kid in records:
        raise ValueError(f"key {new_kid} already exists")
    out = {}
    for kid, record in records.items():
        if _retired(record, now) or record.retire_at is not None:
            out[kid] = record
        else:
            out[kid] = record.model_copy(update={"superseded_at": now, "retire_at": now + grace_s})
    out[new_kid] = KeyRecord(kid=new_kid, created_at=_after_all(records, now))
    return out


def retired(records: Mapping[str, KeyRecord], kid: str, now: float) -> dict[str, KeyRecord]:
    """`records` with `kid` retired from `now` on (an emergency: it stops verifying at once)."""
    if kid not in records:
        raise KeyError(kid)
    record = records[kid]
    if _retired(record, now):
        return dict(records)
    return {**records, kid: record.model_copy(update={"retire_at": now})}


def _after_all(records: Mapping[str, KeyRecord], now: float) -> float:
    """`now`, or just after the newest key if the clock went back: the new key must sign."""
    newest = max((r.created_at for r in records.values()), default=now - 1)
    return now if now > newest else newest + 0.001
