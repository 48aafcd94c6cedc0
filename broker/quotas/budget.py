"""GPU-seconds budgets per period, as pure functions.

Jobs are charged after they ran, with the execution time the site measured, so admission can
only compare what was used so far with the limit: a job admitted while under budget runs to
its end (and may overshoot); the next one is refused until the period resets. Periods are
calendar periods in UTC: a day starts 00:00 UTC, a week on Monday 00:00 UTC, a month on the
1st 00:00 UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker.quotas.policy import Period
from edif.errors import QuotaExceeded


def period_of(t: float, period: Period) -> tuple[float, float]:
    """`[start, end)` of the period containing epoch second `t`."""
    moment = datetime.fromtimestamp(t, UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period is Period.DAY:
        start, end = day, day + timedelta(days=1)
    elif period is Period.WEEK:
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else (start.replace(month=start.month + 1))
        )
    return start.timestamp(), end.timestamp()


def remaining(used: float, limit: float | None) -> float | None:
    """GPU-seconds left (never negative); None when unlimited."""
    return None if limit is None else max(0.0, limit - used)


def admit(used: float, limit: float | None) -> bool:
    """Whether a new job may start: anything left at all (the job is charged afterwards)."""
    return limit is None or used < limit


def check(used: float, limit: float | None, period: Period, now: float, whose: str) -> None:
    """Raise `QuotaExceeded` naming `whose` budget when `admit` says no."""
    if admit(used, limit):
        return
    _, resets = period_of(now, period)
    when = datetime.fromtimestamp(resets, UTC).strftime("%Y-%m-%d %H:%M UTC")
    raise QuotaExceeded(
        f"Quota exceeded: GPU-seconds budget ({whose}, per {period.value}): used "
        f"{used:.3f} of {limit:g} GPU-seconds; resets at {when}."
    )
