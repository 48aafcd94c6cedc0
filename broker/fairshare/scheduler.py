"""The fair-share scheduler: jobs wait at the broker, per model, until a site has room.

Flow: the job service `enqueue`s a job (its owner's pseudonym, its model's queue and a route
finder) and awaits `Ticket.granted()`. Whenever something changes (a job arrives, a slot is
released, and at most every `tick_s` while anything waits, so sites that come back are noticed)
the scheduler *pumps*: it orders every waiting job by `policy.priority_order` (lowest decayed
usage of the owner first, then arrival) and, best first, asks each job's route finder for the
best site that still has room; a job that gets one is granted a slot there. The jobs still
waiting learn their position in their model's queue (`Ticket.position`, `Ticket.changed`).

Room: a site takes at most `jobs_per_worker` jobs per model deployment (each deployment is one
model worker today: `SiteDescription.capacity` counts workers and every `ModelDeployment` has
one), and at most the `max_concurrent_jobs` it advertises in Describe (`site_limit`, 0: no
limit) over all its models. Counting is this broker's own dispatches: a slot is held from the
grant until `Grant.release`, which the service calls when the attempt ends, with the GPU-seconds
the attempt used; they are charged to the owner's decayed usage. A job that fails over simply
enqueues again (its route finder then avoids the sites it already tried).

A job no site can take at all (the route finder raises) fails at once when that is so on its
first examination (as direct dispatch would), and otherwise only after `unroutable_s` (a site
marked unreachable after another job's failure is usually back after its next Describe), or at
once when the error is not `Unavailable` (the model is gone, or the user's groups are refused).

Everything runs on the event loop: no locks; route finders must be quick and synchronous.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from broker.fairshare.policy import DecayedUsage, Order, Waiting, priority_order
from broker.routing import Route
from edif.clock import Clock
from edif.errors import EdifError, Unavailable

# The best route for the job avoiding the given site names; raises EdifError when none is left.
RouteFinder = Callable[[frozenset[str]], Route]


@dataclass(frozen=True)
class Position:
    """Where a waiting job stands in its model's queue (1-based)."""

    index: int
    of: int
    queue: str

    def text(self) -> str:
        return f"Your job is queued (position {self.index} of {self.of} for model {self.queue})."


class Grant:
    """A slot on one site for one attempt; `release` exactly once when the attempt ends."""

    def __init__(self, scheduler: FairShareScheduler, ticket: Ticket, route: Route) -> None:
        self._scheduler = scheduler
        self.ticket = ticket
        self.route = route
        self.released = False

    @property
    def slot(self) -> tuple[str, str]:
        return (self.route.site.name, self.route.deployment.model_key)

    def release(self, gpu_s: float = 0.0) -> None:
        """Free the slot and charge `gpu_s` to the owner; later calls do nothing."""
        if not self.released:
            self.released = True
            self._scheduler._release(self, gpu_s)


class Ticket:
    """One job's place in a queue, until it is granted a slot, fails, or is withdrawn."""

    def __init__(
        self,
        scheduler: FairShareScheduler,
        waiting: Waiting,
        queue: str,
        find_route: RouteFinder,
        affinity: Hashable,
    ) -> None:
        self._scheduler = scheduler
        self.waiting = waiting
        self.queue = queue
        self.find_route = find_route
        self.affinity = affinity  # tickets with equal affinity can use exactly the same sites
        self.position: Position | None = None
        self.changed = asyncio.Event()  # set whenever `position` changes
        self.examined = False
        self.unroutable_since: float | None = None
        self._outcome: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()

    @property
    def job_id(self) -> str:
        return self.waiting.job_id

    @property
    def done(self) -> bool:
        return self._outcome.done()

    async def granted(self) -> Grant:
        """Wait for the grant (or the routing error that ended the wait).

        Cancelling the waiter withdraws the ticket, and gives back a grant made meanwhile.
        """
        try:
            while True:
                done, _ = await asyncio.wait({self._outcome}, timeout=self._scheduler.tick_s)
                if done:
                    return self._outcome.result()
                self._scheduler.pump_if_idle()
        except BaseException:
            self.withdraw()
            raise

    def withdraw(self) -> None:
        """Leave the queue; a grant that was already made is released unused."""
        if not self._outcome.done():
            self._outcome.cancel()
            self._scheduler._forget(self)
        elif not self._outcome.cancelled() and self._outcome.exception() is None:
            self._outcome.result().release(0.0)

    def _move_to(self, position: Position) -> None:
        if position != self.position:
            self.position = position
            self.changed.set()

    def _resolve(self, grant: Grant | None = None, error: EdifError | None = None) -> None:
        if grant is not None:
            self._outcome.set_result(grant)
        else:
            self._outcome.set_exception(error or Unavailable("The job could not be placed."))


class FairShareScheduler:
    def __init__(
        self,
        usage: DecayedUsage,
        site_limit: Callable[[str], int],
        clock: Clock,
        *,
        jobs_per_worker: int = 1,
        unroutable_s: float = 60.0,
        tick_s: float = 1.0,
        order: Order = priority_order,  # policy.arrival_order: plain FIFO, for comparison
    ) -> None:
        if jobs_per_worker < 1:
            raise ValueError("jobs_per_worker must be at least 1")
        self.usage = usage
        self._site_limit = site_limit
        self._clock = clock
        self._jobs_per_worker = jobs_per_worker
        self._unroutable_s = unroutable_s
        self.tick_s = tick_s
        self._order = order
        self._arrivals = itertools.count()
        self._waiting: dict[str, Ticket] = {}  # job id -> ticket, in arrival order
        self._busy_slots: dict[tuple[str, str], int] = {}  # (site, deployment key) -> grants
        self._busy_sites: dict[str, int] = {}
        self._last_pump = float("-inf")

    # -- the job service's side ----------------------------------------------------------------

    def enqueue(
        self,
        job_id: str,
        user: str,
        queue: str,
        find_route: RouteFinder,
        affinity: Hashable | None = None,
    ) -> Ticket:
        """Put a job in `queue` (its model) for `user` (a pseudonym); pumps at once."""
        waiting = Waiting(job_id, user, next(self._arrivals))
        ticket = Ticket(self, waiting, queue, find_route, affinity if affinity else job_id)
        self._waiting[job_id] = ticket
        self.pump()
        return ticket

    async def acquire(
        self,
        job_id: str,
        user: str,
        queue: str,
        find_route: RouteFinder,
        affinity: Hashable | None = None,
    ) -> Grant:
        """`enqueue` and wait for the grant."""
        return await self.enqueue(job_id, user, queue, find_route, affinity).granted()

    # -- what operators and tests look at ------------------------------------------------------

    def queue_order(self, queue: str) -> list[str]:
        """The job ids waiting in `queue`, best first."""
        return [w.job_id for w in self._ordered() if self._waiting[w.job_id].queue == queue]

    def depths(self) -> dict[str, int]:
        """How many jobs wait, per queue."""
        depths: dict[str, int] = {}
        for ticket in self._waiting.values():
            depths[ticket.queue] = depths.get(ticket.queue, 0) + 1
        return depths

    def busy(self, site: str) -> int:
        """Slots this broker holds on `site` now."""
        return self._busy_sites.get(site, 0)

    # -- pumping ---------------------------------------------------------------------------------

    def pump_if_idle(self) -> None:
        """Pump unless someone did within the last tick (waiters call this while they wait)."""
        if self._clock.monotonic() - self._last_pump >= self.tick_s:
            self.pump()

    def pump(self) -> None:
        """Grant every slot that is free to the best waiting job that can use it."""
        self._last_pump = self._clock.monotonic()
        saturated: set[Hashable] = set()  # affinities for which every usable site is full
        still: list[Ticket] = []
        for waiting in self._ordered():
            ticket = self._waiting[waiting.job_id]
            route = None if ticket.affinity in saturated else self._place(ticket)
            if ticket.done:  # failed to route
                self._forget(ticket)
            elif route is not None:
                self._grant(ticket, route)
            else:
                if ticket.unroutable_since is None:
                    saturated.add(ticket.affinity)
                still.append(ticket)
        self._tell_positions(still)

    def _ordered(self) -> list[Waiting]:
        return self._order((t.waiting for t in self._waiting.values()), self.usage.usage)

    def _place(self, ticket: Ticket) -> Route | None:
        """The best site with room for `ticket`; None when every usable one is full (or none is
        usable yet); resolves the ticket with the error when it cannot be placed at all."""
        first, ticket.examined = not ticket.examined, True
        full: set[str] = set()
        while True:
            try:
                route = ticket.find_route(frozenset(full))
            except EdifError as error:
                if full:  # sites exist for it; all are busy
                    ticket.unroutable_since = None
                    return None
                self._unroutable(ticket, error, first)
                return None
            if route.site.name in full:  # a finder that ignores `exclude`: treat as busy
                return None
            if self._has_room(route):
                ticket.unroutable_since = None
                return route
            full.add(route.site.name)

    def _unroutable(self, ticket: Ticket, error: EdifError, first: bool) -> None:
        now = self._clock.monotonic()
        since = ticket.unroutable_since if ticket.unroutable_since is not None else now
        ticket.unroutable_since = since
        if first or not isinstance(error, Unavailable) or now - since >= self._unroutable_s:
            ticket._resolve(error=error)

    def _has_room(self, route: Route) -> bool:
        site = route.site.name
        if self._busy_slots.get((site, route.deployment.model_key), 0) >= self._jobs_per_worker:
            return False
        limit = self._site_limit(site)
        return limit <= 0 or self._busy_sites.get(site, 0) < limit

    def _grant(self, ticket: Ticket, route: Route) -> None:
        grant = Grant(self, ticket, route)
        site, slot = route.site.name, grant.slot
        self._busy_slots[slot] = self._busy_slots.get(slot, 0) + 1
        self._busy_sites[site] = self._busy_sites.get(site, 0) + 1
        self._forget(ticket)
        ticket._resolve(grant)

    def _release(self, grant: Grant, gpu_s: float) -> None:
        site, slot = grant.route.site.name, grant.slot
        self._busy_slots[slot] -= 1
        if not self._busy_slots[slot]:
            del self._busy_slots[slot]
        self._busy_sites[site] -= 1
        if not self._busy_sites[site]:
            del self._busy_sites[site]
        self.usage.charge(grant.ticket.waiting.user, gpu_s)
        self.pump()

    def _forget(self, ticket: Ticket) -> None:
        self._waiting.pop(ticket.job_id, None)

    def _tell_positions(self, still: list[Ticket]) -> None:
        by_queue: dict[str, list[Ticket]] = {}
        for ticket in still:
            by_queue.setdefault(ticket.queue, []).append(ticket)
        for queue, tickets in by_queue.items():
            for index, ticket in enumerate(tickets, start=1):
                ticket._move_to(Position(index, len(tickets), queue))


async def follow_positions(
    ticket: Ticket, publish: Callable[[Position], Awaitable[None]], min_interval_s: float
) -> None:
    """Publish the ticket's position whenever it changes, at most once per `min_interval_s`
    (the latest position wins); runs until cancelled."""
    while True:
        await ticket.changed.wait()
        ticket.changed.clear()
        if ticket.position is not None:
            await publish(ticket.position)
        await asyncio.sleep(min_interval_s)
