"""Time-limited allocations (HPC sites): when to stop taking work, when to hand jobs back.

Role: an agent in a Slurm allocation (or started with `--walltime`) knows when it will be
killed. `allocation_end` finds that moment (the `--walltime` given, else Slurm's
`SLURM_JOB_END_TIME`, else the job's remaining time from `squeue`); `Allocation` turns it into
three phases with the site's `walltime:` margins:

    SERVING ──(ends_at − drain_margin_s)──▶ DRAINING ──(ends_at − handback_margin_s)──▶ LEAVING

DRAINING: no new work (the site advertises `draining`, health NOT_SERVING; new jobs are handed
back), queued jobs are handed back at once, and a running job keeps running only if it is
expected to end before LEAVING (`hand_back`). LEAVING: whatever still runs is handed back.
The broker re-dispatches handed-back jobs (error kind SITE_DRAINING). `follow_allocation`
drives those transitions against a `Drainable` (`site_agent.draining.DrainingExecutor`) and
returns once nothing is in flight; the caller then deregisters and exits 0.

The policy is pure (`Allocation.phase`, `hand_back`), tested with a fake clock.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from edif.clock import Clock
from edif.errors import ConfigError

log = logging.getLogger("edif.agent.walltime")

# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (a bare number is minutes).
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class Phase(enum.StrEnum):
    SERVING = "SERVING"
    DRAINING = "DRAINING"
    LEAVING = "LEAVING"


@dataclass(frozen=True)
class Allocation:
    """When the allocation ends (epoch seconds) and the site's margins before that."""

    ends_at: float
    drain_margin_s: float
    handback_margin_s: float

    @property
    def drain_at(self) -> float:
        return self.ends_at - self.drain_margin_s

    @property
    def handback_at(self) -> float:
        return self.ends_at - self.handback_margin_s

    def phase(self, now: float) -> Phase:
        if now >= self.handback_at:
            return Phase.LEAVING
        if now >= self.drain_at:
            return Phase.DRAINING
        return Phase.SERVING

    def next_change_in(self, now: float) -> float | None:
        """Seconds until the next phase begins; None in the last one."""
        phase = self.phase(now)
        if phase is Phase.SERVING:
            return self.drain_at - now
        if phase is Phase.DRAINING:
            return self.handback_at - now
        return None


@dataclass(frozen=True)
class Flight:
    """A job the site holds: `started_at` None while it waits for its model's worker."""

    job_id: str
    started_at: float | None
    expected_s: float  # recent execution time of its model, or its time limit if none yet


def hand_back(allocation: Allocation, now: float, flights: Sequence[Flight]) -> list[str]:
    """The jobs to hand back to the broker now (the rest keep running)."""
    phase = allocation.phase(now)
    if phase is Phase.SERVING:
        return []
    if phase is Phase.LEAVING:
        return [f.job_id for f in flights]
    return [
        f.job_id
        for f in flights
        if f.started_at is None or f.started_at + f.expected_s > allocation.handback_at
    ]


def parse_walltime(text: str) -> float:
    """Seconds in a Slurm time string ("30" = 30 minutes, "1:30:00", "1-00:00:00")."""
    match = _SLURM_TIME.match(text.strip())
    if not match:
        raise ConfigError(
            f"walltime {text!r} is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS)"
        )
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    assert a is not None
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = a, b or 0, c or 0
    elif c is not None:  # H:M:S
        hours, minutes, seconds = a, b or 0, c
    else:  # M or M:S
        hours, minutes, seconds = 0, a, b or 0
    return float((((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds)


def squeue_time_left(job_id: str) -> str | None:
    """The job's remaining time as `squeue` prints it, or None without a usable squeue."""
    try:
        done = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%L"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def allocation_end(
    walltime: str | None,
    env: Mapping[str, str],
    now: float,
    time_left: Callable[[str], str | None] = squeue_time_left,
) -> tuple[float, str] | None:
    """When this agent's allocation ends (epoch seconds) and where that came from; None if
    it does not (no `--walltime`, not under Slurm, or a job without a time limit)."""
    if walltime:
        return now + parse_walltime(walltime), f"--walltime {walltime}"
    end = env.get("SLURM_JOB_END_TIME", "").strip()
    if end.isdigit() and int(end) > 0:
        return float(end), "SLURM_JOB_END_TIME"
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if job_id:
        left = time_left(job_id)
        if left and _SLURM_TIME.match(left):  # not UNLIMITED, NOT_SET, INVALID
            return now + parse_walltime(left), f"squeue time left of Slurm job {job_id}"
        log.warning("Slurm job %s: no time limit found; serving without a walltime", job_id)
    return None


class Drainable(Protocol):
    def start_draining(self) -> None: ...

    def flights(self) -> list[Flight]: ...

    async def hand_back(self, job_ids: Sequence[str]) -> None: ...


async def follow_allocation(
    allocation: Allocation,
    front: Drainable,
    clock: Clock,
    on_drain: Callable[[], Awaitable[None]] | None = None,
    poll_s: float = 0.5,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Serve until the drain time, drain, hand jobs back by the policy; return once idle."""
    while allocation.phase(clock.now()) is Phase.SERVING:
        wait = allocation.drain_at - clock.now()
        await sleep(max(0.0, min(wait, 60.0)))  # re-read the clock: long sleeps drift
    front.start_draining()
    if on_drain is not None:
        await on_drain()
    while flights := front.flights():
        now = clock.now()
        chosen = hand_back(allocation, now, flights)
        if chosen:
            log.warning("allocation ends soon: handing back %d job(s)", len(chosen))
            await front.hand_back(chosen)
            continue
        wait = allocation.next_change_in(now)
        await sleep(poll_s if wait is None else max(0.0, min(poll_s, wait)))
