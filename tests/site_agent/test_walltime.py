"""The walltime policy (pure, fake clock), Slurm time parsing and detection, and the follower."""

from __future__ import annotations

import pytest

from edif.clock import FakeClock
from edif.errors import ConfigError
from site_agent.config import SiteConfig
from site_agent.walltime import (
    Allocation,
    Flight,
    Phase,
    allocation_end,
    follow_allocation,
    hand_back,
    parse_walltime,
)

T0 = 1_800_000_000.0
ALLOC = Allocation(ends_at=T0 + 3600, drain_margin_s=600, handback_margin_s=120)


def test_phases_follow_the_margins() -> None:
    assert ALLOC.phase(T0) is Phase.SERVING
    assert ALLOC.next_change_in(T0) == 3000
    assert ALLOC.phase(T0 + 2999.9) is Phase.SERVING
    assert ALLOC.phase(T0 + 3000) is Phase.DRAINING
    assert ALLOC.next_change_in(T0 + 3000) == 480
    assert ALLOC.phase(T0 + 3480) is Phase.LEAVING
    assert ALLOC.next_change_in(T0 + 3480) is None


def test_hand_back_keeps_only_jobs_that_end_in_time() -> None:
    handback_at = ALLOC.handback_at  # T0 + 3480
    flights = [
        Flight("queued", None, 1.0),
        Flight("short", handback_at - 100, 60.0),  # ends 40 s before the hand-back time
        Flight("long", handback_at - 100, 200.0),  # would end 100 s after it
        Flight("exact", handback_at - 100, 100.0),
    ]
    assert hand_back(ALLOC, T0, flights) == []  # still serving: nothing goes back
    assert hand_back(ALLOC, ALLOC.drain_at, flights) == ["queued", "long"]
    assert hand_back(ALLOC, handback_at, flights) == ["queued", "short", "long", "exact"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),  # a bare number is minutes, as in sbatch --time
        ("1:30", 90),
        ("0:45", 45),
        ("02:00:00", 7200),
        ("1-00", 86400),
        ("1-02:03", 86400 + 7200 + 180),
        ("2-00:00:05", 2 * 86400 + 5),
    ],
)
def test_slurm_time_formats(text: str, seconds: int) -> None:
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "UNLIMITED", "1:2:3:4", "-5"])
def test_bad_walltime_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="not a Slurm time"):
        parse_walltime(text)


def test_allocation_end_prefers_the_flag_then_slurm() -> None:
    never = lambda job: pytest.fail("squeue must not be asked")  # noqa: E731
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_END_TIME": str(int(T0 + 500))}
    assert allocation_end("1:00:00", env, T0, never) == (T0 + 3600, "--walltime 1:00:00")
    assert allocation_end(None, env, T0, never) == (T0 + 500, "SLURM_JOB_END_TIME")
    # Older Slurm: no end time in the environment, the job's remaining time from squeue.
    asked = []
    left = lambda job: asked.append(job) or "1-00:10:00"  # noqa: E731
    end, source = allocation_end(None, {"SLURM_JOB_ID": "42"}, T0, left)
    assert (end, asked) == (T0 + 86400 + 600, ["42"]) and "squeue" in source
    assert allocation_end(None, {"SLURM_JOB_ID": "42"}, T0, lambda job: "UNLIMITED") is None
    assert allocation_end(None, {}, T0, never) is None  # not under Slurm, no flag


def test_site_config_margins_are_validated() -> None:
    base = {"site": "fau", "models": [{"repo_id": "x/y"}]}
    cfg = SiteConfig.model_validate(base)
    assert (cfg.walltime.drain_margin_s, cfg.walltime.handback_margin_s) == (600, 120)
    with pytest.raises(ValueError, match="handback_margin_s must be smaller"):
        SiteConfig.model_validate(
            {**base, "walltime": {"drain_margin_s": 60, "handback_margin_s": 60}}
        )


class FakeFront:
    """A `Drainable` whose jobs finish when the test says so."""

    def __init__(self, clock: FakeClock, flights: list[Flight]) -> None:
        self.clock = clock
        self.flights_now = list(flights)
        self.draining_at: float | None = None
        self.handed_back: list[tuple[float, str]] = []
        self.finish: dict[str, float] = {}  # job -> when it completes by itself

    def start_draining(self) -> None:
        self.draining_at = self.clock.now()

    def flights(self) -> list[Flight]:
        now = self.clock.now()
        self.flights_now = [f for f in self.flights_now if self.finish.get(f.job_id, 1e18) > now]
        return list(self.flights_now)

    async def hand_back(self, job_ids) -> None:
        for job_id in job_ids:
            self.handed_back.append((self.clock.now(), job_id))
        self.flights_now = [f for f in self.flights_now if f.job_id not in job_ids]


async def test_follower_drains_lets_short_jobs_finish_and_hands_back_the_rest() -> None:
    clock = FakeClock(T0)
    alloc = Allocation(ends_at=T0 + 1000, drain_margin_s=300, handback_margin_s=60)
    front = FakeFront(
        clock,
        [
            Flight("short", T0 + 650, 30.0),  # started before the drain, expected to end in time
            Flight("slow", T0 + 650, 30.0),  # expected to, but overruns: back at hand-back time
            Flight("huge", T0 + 690, 900.0),  # cannot end in time: back at once
            Flight("queued", None, 5.0),
        ],
    )
    front.finish = {"short": T0 + 720}
    drained: list[float] = []

    async def on_drain() -> None:
        drained.append(clock.now())

    async def sleep(seconds: float) -> None:
        assert seconds >= 0
        clock.advance(max(seconds, 0.01))

    await follow_allocation(alloc, front, clock, on_drain, poll_s=5.0, sleep=sleep)
    assert front.draining_at == drained[0] == T0 + 700
    assert front.handed_back[:2] == [(T0 + 700, "huge"), (T0 + 700, "queued")]
    assert front.handed_back[2:] == [(T0 + 940, "slow")]  # "short" finished by itself
    assert front.flights() == []
