"""Fair-share policy, pure: decayed recent usage per user and the order waiting jobs get slots.

Usage is GPU-seconds charged when a job finishes, decayed exponentially with a half-life, as in
Slurm's fair-share factor: a charge of `c` made `t` seconds ago counts `c * 2 ** (-t / half_life)`.
Each user's usage is kept as one (value, as-of) pair; reading or charging first decays the value
to now, so the sum over all past charges never has to be stored.

Priority: the waiting job whose owner has the lowest decayed usage goes first; equal usage
(typically zero: nobody has run anything yet) falls back to arrival order. A user who has just
used a lot waits behind everyone who has used less, and is forgiven as the usage decays.

Users are the broker's keyed pseudonyms, never raw ids. Times come from an injected `Clock`
(monotonic seconds), so the arithmetic is tested with `edif.clock.FakeClock`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edif.clock import Clock

# Below this a user's decayed usage is dropped (it can no longer change anyone's order).
FORGOTTEN_GPU_S = 1e-9


def decayed(value: float, elapsed_s: float, half_life_s: float) -> float:
    """`value` after `elapsed_s` seconds of exponential decay with `half_life_s`."""
    if elapsed_s <= 0:
        return value
    return value * 0.5 ** (elapsed_s / half_life_s)


class DecayedUsage:
    """Each user's recent GPU-seconds, decayed with a half-life (Slurm fair share)."""

    def __init__(self, half_life_s: float, clock: Clock) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        self.half_life_s = half_life_s
        self._clock = clock
        self._usage: dict[str, tuple[float, float]] = {}  # user -> (GPU-seconds, as of)

    def charge(self, user: str, gpu_s: float) -> None:
        """Add `gpu_s` GPU-seconds used just now by `user` (negative or zero: nothing)."""
        if gpu_s <= 0:
            return
        now = self._clock.monotonic()
        self._usage[user] = (self._at(user, now) + gpu_s, now)

    def usage(self, user: str) -> float:
        """`user`'s decayed usage now (0.0 for someone never charged)."""
        return self._at(user, self._clock.monotonic())

    def snapshot(self) -> dict[str, float]:
        """Every remembered user's decayed usage now; forgets those decayed to nothing."""
        now = self._clock.monotonic()
        current = {user: self._at(user, now) for user in list(self._usage)}
        for user, value in current.items():
            if value < FORGOTTEN_GPU_S:
                del self._usage[user]
        return {user: value for user, value in current.items() if value >= FORGOTTEN_GPU_S}

    def seed(self, charges: Iterable[tuple[str, float, float]], wall_now: float) -> None:
        """Start from recorded charges `(user, GPU-seconds, wall-clock time charged)`, each
        decayed by its age: a restarted broker still knows who has used the GPUs lately."""
        now = self._clock.monotonic()
        for user, gpu_s, at in charges:
            if gpu_s > 0:
                value = decayed(gpu_s, max(0.0, wall_now - at), self.half_life_s)
                self._usage[user] = (self._at(user, now) + value, now)

    def _at(self, user: str, now: float) -> float:
        value, since = self._usage.get(user, (0.0, now))
        return decayed(value, now - since, self.half_life_s)


@dataclass(frozen=True)
class Waiting:
    """A job waiting for a slot: whose it is and when it arrived (a strictly increasing seq)."""

    job_id: str
    user: str
    arrival: int


def priority_order(waiting: Iterable[Waiting], usage: Callable[[str], float]) -> list[Waiting]:
    """`waiting` best first: lowest decayed usage of the owner, then earliest arrival."""
    cache: dict[str, float] = {}

    def key(entry: Waiting) -> tuple[float, int]:
        if entry.user not in cache:
            cache[entry.user] = usage(entry.user)
        return (cache[entry.user], entry.arrival)

    return sorted(waiting, key=key)


def arrival_order(waiting: Iterable[Waiting], usage: Callable[[str], float]) -> list[Waiting]:
    """`waiting` in arrival order, usage ignored: plain FIFO (for comparison and as a fallback)."""
    return sorted(waiting, key=lambda entry: entry.arrival)


# How waiting jobs are ranked, given each user's usage; by `fair_share_order` setting.
Order = Callable[[Iterable[Waiting], Callable[[str], float]], list[Waiting]]
ORDERS: dict[str, Order] = {
    "usage": priority_order,
    "arrival": arrival_order,
}
