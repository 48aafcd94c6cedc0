"""Token bucket rate limiting, as a pure function of (state, now).

A user's bucket holds up to `burst` tokens and refills at `rate` tokens per second; each
request takes one. Time is the caller's monotonic clock, so tests drive it with a FakeClock and
a wall-clock jump (NTP) cannot refill or drain a bucket.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BucketState:
    tokens: float
    updated: float  # monotonic seconds of the last refill


def take(
    state: BucketState | None, now: float, rate: float, burst: float
) -> tuple[bool, BucketState, float]:
    """Try to take one token: `(allowed, new_state, retry_after_s)`.

    A new user (`state` None) starts with a full bucket. When refused, the state still records
    the refill (so nothing is lost) and `retry_after_s` is how long until one token is there.
    """
    if state is None:
        tokens = float(burst)
    else:
        elapsed = max(0.0, now - state.updated)  # a clock that went back refills nothing
        tokens = min(float(burst), state.tokens + elapsed * rate)
    if tokens >= 1.0:
        return True, BucketState(tokens - 1.0, now), 0.0
    return False, BucketState(tokens, now), (1.0 - tokens) / rate
