"""Quota policies per role and per group, and which one applies to a user.

Precedence (most specific wins, then most generous among equals):

1. If any of the user's groups has a group policy, the user's limits come from the group
   policies; with several, each limit is the most generous of them (membership is a grant:
   joining a second group never takes away what the first gave).
2. Otherwise the role's policy applies, if governance set one.
3. Otherwise the broker's defaults (`BrokerSettings.quota_defaults`), generous by design.

A group policy overrides the role policy even when it is stricter: governance sets a group
policy deliberately for that group (a course with a small budget, a funded project with a big
one), while a role policy is a blanket for everyone else. "Most generous of everything" would
make a restrictive group policy impossible.

`group_gpu_seconds_per_period` on a group policy is a pool the whole group shares, enforced in
addition to each member's own `gpu_seconds_per_period`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

MiB = 1024 * 1024
GiB = 1024 * MiB


class Period(StrEnum):
    """Budget periods; boundaries are UTC (weeks start Monday 00:00 UTC)."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class Scope(StrEnum):
    ROLE = "role"
    GROUP = "group"


class QuotaPolicy(BaseModel):
    """What one user may use. `None` for a GPU budget means unlimited."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_per_s: float = Field(default=20.0, gt=0)  # token refill rate for POST /request
    burst: int = Field(default=200, ge=1)  # bucket size: requests allowed back to back
    max_concurrent: int = Field(default=64, ge=1)  # unfinished jobs at once
    max_payload_bytes: int = Field(default=256 * MiB, ge=1)
    max_result_bytes: int = Field(default=4 * GiB, ge=1)
    gpu_seconds_per_period: float | None = Field(default=None, ge=0)  # per user
    period: Period = Period.DAY
    group_gpu_seconds_per_period: float | None = Field(default=None, ge=0)  # group pool


class PolicyUpdate(BaseModel):
    """A change to one policy: fields left out keep their current (or default) value."""

    model_config = ConfigDict(extra="forbid")

    rate_per_s: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    max_payload_bytes: int | None = Field(default=None, ge=1)
    max_result_bytes: int | None = Field(default=None, ge=1)
    gpu_seconds_per_period: float | None = Field(default=None, ge=0)
    period: Period | None = None
    group_gpu_seconds_per_period: float | None = Field(default=None, ge=0)
    # Explicit "set this budget back to unlimited" (None above means "leave as it is").
    unlimited_gpu_seconds: bool = False
    unlimited_group_gpu_seconds: bool = False

    def apply_to(self, base: QuotaPolicy) -> QuotaPolicy:
        changes = self.model_dump(
            exclude_none=True, exclude={"unlimited_gpu_seconds", "unlimited_group_gpu_seconds"}
        )
        if self.unlimited_gpu_seconds:
            changes["gpu_seconds_per_period"] = None
        if self.unlimited_group_gpu_seconds:
            changes["group_gpu_seconds_per_period"] = None
        return QuotaPolicy.model_validate({**base.model_dump(), **changes})


class PolicySet(BaseModel):
    """Every policy governance has set, plus the defaults."""

    defaults: QuotaPolicy = Field(default_factory=QuotaPolicy)
    roles: dict[str, QuotaPolicy] = Field(default_factory=dict)
    groups: dict[str, QuotaPolicy] = Field(default_factory=dict)


def resolve(policies: PolicySet, role: str, groups: Iterable[str]) -> QuotaPolicy:
    """The limits that apply to a user with `role` in `groups` (see the module docstring)."""
    matching = [policies.groups[g] for g in sorted(set(groups)) if g in policies.groups]
    if matching:
        return most_generous(matching)
    return policies.roles.get(str(role), policies.defaults)


def most_generous(policies: list[QuotaPolicy]) -> QuotaPolicy:
    """Field by field, the largest limit; an unlimited budget beats any number."""
    first = policies[0]
    if len(policies) == 1:
        return first
    budgets = [p.gpu_seconds_per_period for p in policies]
    # The budget and its period go together: take the period of the policy whose budget won.
    if any(b is None for b in budgets):
        budget, period = None, next(p.period for p in policies if p.gpu_seconds_per_period is None)
    else:
        best = max(policies, key=lambda p: p.gpu_seconds_per_period or 0.0)
        budget, period = best.gpu_seconds_per_period, best.period
    return QuotaPolicy(
        rate_per_s=max(p.rate_per_s for p in policies),
        burst=max(p.burst for p in policies),
        max_concurrent=max(p.max_concurrent for p in policies),
        max_payload_bytes=max(p.max_payload_bytes for p in policies),
        max_result_bytes=max(p.max_result_bytes for p in policies),
        gpu_seconds_per_period=budget,
        period=period,
        # Pools are per group and enforced one by one (`group_pools`), not merged here.
        group_gpu_seconds_per_period=None,
    )


def group_pools(
    groups: Mapping[str, QuotaPolicy], member_of: Iterable[str]
) -> dict[str, QuotaPolicy]:
    """The user's groups whose policy sets a shared GPU-seconds pool."""
    return {
        g: groups[g]
        for g in sorted(set(member_of))
        if g in groups and groups[g].group_gpu_seconds_per_period is not None
    }
