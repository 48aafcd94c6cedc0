"""`DurableJobs`: the service's asynchronous view of a `JobStore`.

Every store call runs on one thread of its own, so the event loop never waits on disk or a
database and calls are applied in the order the service made them (a job's RECEIVED is never
overtaken by its QUEUED). The instance's lease is renewed from the same thread, by
`heartbeat()`, which the service calls on a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from broker.jobs import Job
from broker.jobstore.base import JobStore
from broker.jobstore.records import to_job, to_record
from edif.clock import Clock

T = TypeVar("T")


class DurableJobs:
    def __init__(self, store: JobStore, instance: str, clock: Clock, lease_s: float) -> None:
        self.instance = instance
        self.lease_s = lease_s
        self._store = store
        self._clock = clock
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edif-jobstore")
        self._closed = False

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def create(self, job: Job) -> None:
        """Record a new job (with its payload, until it ends) before anyone hears of it."""
        await self._call(
            self._store.create, to_record(job), job.payload, self.instance, self._clock.now()
        )

    async def save(self, job: Job) -> bool:
        """Record the job's current state; False when another broker instance owns it now."""
        return await self.save_soon(job)

    def save_soon(self, job: Job) -> asyncio.Future[bool]:
        """`save`, without waiting: the record is taken now and written after every earlier
        call (one thread, in order), so a later awaited `save` lands after it."""
        return asyncio.get_running_loop().run_in_executor(
            self._thread, self._store.save, to_record(job), self.instance, self._clock.now()
        )

    async def load(self, job_id: str) -> Job | None:
        """A job as stored (without its payload), or None."""
        record = await self._call(self._store.get, job_id)
        return to_job(record, None) if record is not None else None

    async def heartbeat(self) -> None:
        await self._call(self._store.heartbeat, self.instance, self._clock.now())

    async def claim_orphans(self, include_own: bool) -> list[Job]:
        """Take over unfinished jobs whose broker is gone; each comes with its payload."""
        records = await self._call(
            self._store.claim_orphans,
            self.instance,
            self._clock.now(),
            self.lease_s,
            include_own,
        )
        jobs = []
        for record in records:
            jobs.append(to_job(record, await self._call(self._store.payload, record.id)))
        return jobs

    async def purge(self, finished_before: float) -> int:
        return await self._call(self._store.purge, finished_before)

    async def close(self) -> None:
        """Close the store once (the service's close runs more than once on shutdown)."""
        if self._closed:
            return
        self._closed = True
        await self._call(self._store.close)
        self._thread.shutdown(wait=True)
