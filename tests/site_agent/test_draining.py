"""DrainingExecutor over a fake executor: pass-through, draining refusals, handing jobs back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from edif.clock import FakeClock
from proto import site_agent_pb2 as pb
from site_agent.config import SiteConfig
from site_agent.draining import DrainingExecutor
from site_agent.executor import JobSpec

CFG = SiteConfig.model_validate(
    {"site": "fau", "models": [{"repo_id": "x/y"}], "limits": {"execution_time_s": 120}}
)
KEY = CFG.models[0].model_key


class FakeSlot:
    recent_execution_s = 0.0


class FakeInner:
    """Jobs queue until `start` is set, then run until `finish` is set (or a cancel)."""

    def __init__(self) -> None:
        self.config = CFG
        self.slots = {KEY: FakeSlot()}
        self.start = asyncio.Event()
        self.finish = asyncio.Event()
        self.cancelled: list[str] = []
        self.closed: list[str] = []

    def describe(self) -> pb.SiteDescription:
        return pb.SiteDescription(site="fau", capacity=1)

    async def execute(self, job: JobSpec) -> AsyncIterator[pb.ExecuteUpdate]:
        try:
            yield pb.ExecuteUpdate(status=pb.StatusUpdate(phase=pb.QUEUED))
            await self.start.wait()
            yield pb.ExecuteUpdate(status=pb.StatusUpdate(phase=pb.RUNNING))
            await self.finish.wait()
            if job.job_id in self.cancelled:
                yield pb.ExecuteUpdate(error=pb.JobError(kind=pb.CANCELLED))
                return
            yield pb.ExecuteUpdate(chunk=pb.ResultChunk(data=b"ok"))
            yield pb.ExecuteUpdate(done=pb.ResultEnd(total_bytes=2))
        finally:
            self.closed.append(job.job_id)

    async def cancel(self, job_id: str) -> bool:
        self.cancelled.append(job_id)
        self.finish.set()
        return True


def job(job_id: str, limit: float = 0.0) -> JobSpec:
    return JobSpec(job_id, KEY, b"", False, time_limit_s=limit)


async def collect(stream: AsyncIterator[pb.ExecuteUpdate], into: list) -> None:
    async for update in stream:
        into.append(update)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_serving_passes_everything_through() -> None:
    inner = FakeInner()
    front = DrainingExecutor(inner, FakeClock())
    inner.start.set()
    inner.finish.set()
    updates: list = []
    await collect(front.execute(job("j1")), updates)
    assert [u.WhichOneof("update") for u in updates] == ["status", "status", "chunk", "done"]
    assert front.describe().draining is False and front.flights() == []


async def test_draining_site_says_so_and_hands_new_jobs_back() -> None:
    inner = FakeInner()
    front = DrainingExecutor(inner)
    front.start_draining()
    assert front.describe().draining is True
    updates: list = []
    await collect(front.execute(job("late")), updates)
    assert len(updates) == 1 and updates[0].error.kind == pb.SITE_DRAINING
    assert "fau is leaving" in updates[0].error.description
    assert inner.closed == []  # never reached the executor


async def test_hand_back_ends_queued_and_running_jobs_with_site_draining() -> None:
    inner = FakeInner()
    clock = FakeClock()
    front = DrainingExecutor(inner, clock)
    queued: list = []
    task = asyncio.create_task(collect(front.execute(job("q1", limit=30)), queued))
    await settle()
    assert [(f.job_id, f.started_at, f.expected_s) for f in front.flights()] == [("q1", None, 30)]
    await front.hand_back(["q1"])
    await task
    assert queued[-1].error.kind == pb.SITE_DRAINING
    assert inner.cancelled == [] and inner.closed == ["q1"]  # left its queue, no worker stopped

    running: list = []
    task = asyncio.create_task(collect(front.execute(job("r1")), running))
    inner.start.set()
    await settle()
    (flight,) = front.flights()
    assert flight.started_at == clock.now() and flight.expected_s == 120  # the site's limit
    await front.hand_back(["r1"])
    await task
    assert inner.cancelled == ["r1"]  # the worker was stopped through the executor
    kinds = [u.error.kind for u in running if u.HasField("error")]
    assert kinds == [pb.SITE_DRAINING]  # not CANCELLED: the broker re-dispatches it
    assert front.flights() == []


async def test_results_are_not_piled_up_ahead_of_the_grpc_stream() -> None:
    produced: list[int] = []

    class Chunky(FakeInner):
        async def execute(self, job: JobSpec) -> AsyncIterator[pb.ExecuteUpdate]:
            for i in range(100):
                produced.append(i)
                yield pb.ExecuteUpdate(chunk=pb.ResultChunk(data=b"x" * 1024))

    front = DrainingExecutor(Chunky())
    stream = front.execute(job("big"))
    first = await anext(stream)
    await settle()
    assert first.chunk.data and len(produced) <= 4  # backpressure reaches the worker
    await stream.aclose()
    assert front.flights() == []
