"""The executor the gRPC servicer sees: the real one, plus draining and handing jobs back.

Role: a site that is leaving (its allocation ends, `edif agent leave`) must stop taking work
and give back jobs it will not finish, so the broker runs them elsewhere. `DrainingExecutor`
wraps the `PoolExecutor`: while serving it passes every call through and records each job in
flight (queued, or running since when); once `start_draining()` is called Describe says
`draining` and new jobs end at once with a `SITE_DRAINING` error (the broker's cue to
re-dispatch). `hand_back(job_ids)` ends those jobs' streams with `SITE_DRAINING`: a running
job's worker is stopped through the inner executor's cancel, a queued one just leaves its
queue. When to hand back what is `site_agent.walltime`'s policy, not this module's.

Each job's updates are pumped from the inner executor by a task into a small queue (the
gRPC stream's backpressure still reaches the worker: result chunks are not piled up here), so
a hand-back can end the stream while the inner executor is still waiting on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edif.clock import Clock, SystemClock
from proto import site_agent_pb2 as pb
from site_agent.config import SiteConfig
from site_agent.executor import Executor, JobSpec
from site_agent.walltime import Flight


class _Slot(Protocol):
    recent_execution_s: float


class InnerExecutor(Executor, Protocol):
    config: SiteConfig
    slots: dict[str, _Slot]


_END = object()
_HANDED_BACK = object()


@dataclass
class _InFlight:
    spec: JobSpec
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=2))
    pump: asyncio.Task | None = None
    started_at: float | None = None
    handed_back: bool = False


class DrainingExecutor:
    def __init__(self, inner: InnerExecutor, clock: Clock | None = None) -> None:
        self.inner = inner
        self.draining = False
        self._clock = clock or SystemClock()
        self._flights: dict[str, _InFlight] = {}

    def start_draining(self) -> None:
        self.draining = True

    def describe(self) -> pb.SiteDescription:
        description = self.inner.describe()
        description.draining = self.draining
        return description

    async def cancel(self, job_id: str) -> bool:
        return await self.inner.cancel(job_id)

    def flights(self) -> list[Flight]:
        """Jobs in flight that have not been handed back, oldest first."""
        return [
            Flight(job_id, f.started_at, self._expected_s(f.spec))
            for job_id, f in self._flights.items()
            if not f.handed_back
        ]

    async def hand_back(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            flight = self._flights.get(job_id)
            if flight is None or flight.handed_back:
                continue
            flight.handed_back = True
            if flight.started_at is not None:
                await self.inner.cancel(job_id)  # stops the worker (it is replaced)
            if flight.pump is not None:
                flight.pump.cancel()  # puts nothing more; a queued job leaves its queue
            while not flight.queue.empty():  # updates not relayed yet no longer count
                flight.queue.get_nowait()
            flight.queue.put_nowait(_HANDED_BACK)

    async def execute(self, job: JobSpec) -> AsyncIterator[pb.ExecuteUpdate]:
        if self.draining:
            yield self._handed_back_error()
            return
        flight = self._flights[job.job_id] = _InFlight(job)
        flight.pump = pump = asyncio.create_task(self._pump(flight), name=f"job-{job.job_id}")
        try:
            while True:
                item = await flight.queue.get()
                if item is _END:
                    return
                if item is _HANDED_BACK:
                    yield self._handed_back_error()
                    return
                if isinstance(item, BaseException):
                    raise item
                if item.HasField("status") and item.status.phase == pb.RUNNING:
                    flight.started_at = self._clock.now()
                yield item
                if item.HasField("done") or item.HasField("error"):
                    return
        finally:
            self._flights.pop(job.job_id, None)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump

    async def _pump(self, flight: _InFlight) -> None:
        try:
            async for update in self.inner.execute(flight.spec):
                await flight.queue.put(update)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # surfaces in the servicer's stream, as before
            await flight.queue.put(error)
        await flight.queue.put(_END)

    def _expected_s(self, spec: JobSpec) -> float:
        slot = self.inner.slots.get(spec.model_key)
        recent = slot.recent_execution_s if slot is not None else 0.0
        if recent > 0:
            return recent
        limit = self.inner.config.limits.execution_time_s
        return min(spec.time_limit_s, limit) if spec.time_limit_s > 0 else limit

    def _handed_back_error(self) -> pb.ExecuteUpdate:
        site = self.inner.config.site
        text = f"Site {site} is leaving (draining) and handed your job back unfinished."

        return pb.ExecuteUpdate(error=pb.JobError(kind=pb.SITE_DRAINING, description=text))
