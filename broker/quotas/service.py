"""`QuotaService`: the broker's fair-use gate, from POST /request to the job's end.

Flow for one job:

1. `admit(identity, payload_bytes)` at POST time resolves the user's policy (`policy.resolve`)
   and checks, in order: payload size (413), GPU-seconds budgets of the user and of each group
   pool (429), concurrent jobs (429), request rate (429, token bucket). Only an admitted
   request takes a rate token and a concurrency slot; the returned `Admission` carries the
   limits the job runs under (e.g. `max_result_bytes`).
2. `release(admission)` when the job ends, whatever the outcome (frees the slot; idempotent).
3. `charge(admission, gpu_seconds)` with the site-measured execution time, for completed jobs
   and failed ones that ran: written to the ledger for the user's pseudonym and each group.

Policies live in the store (durable) and are cached here; `set_policy` writes through. Rate
buckets and concurrency counts are in memory: a restart forgets them, which only errs on the
generous side. Everything is keyed by the user's pseudonym, never the raw `sub`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel

from broker.ports import Identity
from broker.quotas import budget, caps
from broker.quotas.bucket import BucketState, take
from broker.quotas.policy import (
    Period,
    PolicySet,
    PolicyUpdate,
    QuotaPolicy,
    Scope,
    group_pools,
    resolve,
)
from broker.quotas.store import QuotaStore, UsageRow
from edif.clock import Clock
from edif.errors import NotFound, QuotaExceeded

_ids = itertools.count(1)


@dataclass(eq=False)
class Admission:
    """One admitted job's claim on its owner's quotas."""

    pseudonym: str
    groups: tuple[str, ...]
    policy: QuotaPolicy
    id: int = field(default_factory=lambda: next(_ids))
    released: bool = False


class UsageReport(BaseModel):
    period: Period
    start: float
    end: float
    rows: list[UsageRow]
    active_jobs: dict[str, int]  # pseudonym -> unfinished jobs


class QuotaService:
    def __init__(
        self,
        store: QuotaStore,
        pseudonymize: Callable[[str], str],
        clock: Clock,
        defaults: QuotaPolicy | None = None,
    ) -> None:
        self._store = store
        self._pseudonymize = pseudonymize
        self._clock = clock
        self._policies = PolicySet(
            defaults=defaults or QuotaPolicy(),
            roles=store.policies(Scope.ROLE),
            groups=store.policies(Scope.GROUP),
        )
        self._buckets: dict[str, BucketState] = {}
        self._active: dict[str, int] = {}

    # -- the job's path ----------------------------------------------------------------------

    def admit(self, identity: Identity, payload_bytes: int) -> Admission:
        """Admit one job or raise `QuotaExceeded` / `PayloadTooLarge` saying why."""
        pseudonym = self._pseudonymize(identity.sub)
        groups = tuple(identity.groups)
        policy = resolve(self._policies, str(identity.role), groups)
        caps.check_payload(payload_bytes, policy.max_payload_bytes)
        self._check_budgets(pseudonym, groups, policy)
        caps.check_concurrent(self._active.get(pseudonym, 0), policy.max_concurrent)
        self._take_token(pseudonym, policy)
        self._active[pseudonym] = self._active.get(pseudonym, 0) + 1
        return Admission(pseudonym, groups, policy)

    def release(self, admission: Admission) -> None:
        if admission.released:
            return
        admission.released = True
        left = self._active.get(admission.pseudonym, 0) - 1
        if left > 0:
            self._active[admission.pseudonym] = left
        else:
            self._active.pop(admission.pseudonym, None)

    def charge(self, who: Admission | Identity, gpu_seconds: float, job_id: str = "") -> None:
        """Record GPU-seconds used against the user and each of their groups."""
        if gpu_seconds <= 0:
            return
        if isinstance(who, Admission):
            pseudonym, groups = who.pseudonym, who.groups
        else:
            pseudonym, groups = self._pseudonymize(who.sub), tuple(who.groups)
        entries = [("user", pseudonym), *(("group", g) for g in sorted(set(groups)))]
        self._store.charge(entries, gpu_seconds, self._clock.now(), job_id)

    # -- governance --------------------------------------------------------------------------

    def pseudonym(self, sub: str) -> str:
        """The name logs and reports use for `sub`."""
        return self._pseudonymize(sub)

    def policies(self) -> PolicySet:
        return self._policies

    def policy_for(self, identity: Identity) -> QuotaPolicy:
        return resolve(self._policies, str(identity.role), identity.groups)

    def set_policy(self, scope: Scope, name: str, update: PolicyUpdate) -> QuotaPolicy:
        """Create or change the policy of one role or group; returns the policy now in force."""
        table = self._table(scope)
        policy = update.apply_to(table.get(name, self._policies.defaults))
        self._store.put_policy(scope, name, policy, self._clock.now())
        table[name] = policy
        return policy

    def delete_policy(self, scope: Scope, name: str) -> None:
        table = self._table(scope)
        if name not in table:
            raise NotFound(f"No {scope.value} policy named {name!r}.")
        self._store.delete_policy(scope, name)
        del table[name]

    def usage(self, period: Period = Period.DAY, at: float | None = None) -> UsageReport:
        """GPU-seconds per user pseudonym and per group in the period containing `at`."""
        start, end = budget.period_of(self._clock.now() if at is None else at, period)
        return UsageReport(
            period=period,
            start=start,
            end=end,
            rows=self._store.usage(start, end),
            active_jobs=dict(self._active),
        )

    def used(self, scope: str, name: str, period: Period) -> float:
        start, end = budget.period_of(self._clock.now(), period)
        return self._store.used(scope, name, start, end)

    # -- checks ------------------------------------------------------------------------------

    def _check_budgets(self, pseudonym: str, groups: tuple[str, ...], policy: QuotaPolicy) -> None:
        now = self._clock.now()
        if policy.gpu_seconds_per_period is not None:
            used = self.used("user", pseudonym, policy.period)
            budget.check(used, policy.gpu_seconds_per_period, policy.period, now, "yours")
        for group, pool in group_pools(self._policies.groups, groups).items():
            used = self.used("group", group, pool.period)
            budget.check(
                used, pool.group_gpu_seconds_per_period, pool.period, now, f"group {group}"
            )

    def _take_token(self, pseudonym: str, policy: QuotaPolicy) -> None:
        allowed, state, retry_after = take(
            self._buckets.get(pseudonym),
            self._clock.monotonic(),
            policy.rate_per_s,
            policy.burst,
        )
        self._buckets[pseudonym] = state
        if not allowed:
            raise QuotaExceeded(
                f"Quota exceeded: request rate: you used all {policy.burst} requests of your "
                f"burst (limit: {policy.burst} at once, refilled at {policy.rate_per_s:g} per "
                f"second); the next one is allowed in {retry_after:.2f} s."
            )

    def _table(self, scope: Scope) -> dict[str, QuotaPolicy]:
        return self._policies.roles if scope is Scope.ROLE else self._policies.groups
