"""`RayWorkerHandle`: how the agent drives a job on a worker actor (begin, then more).

A fake actor stands in for Ray's handle: each `.remote()` call is recorded and answers with an
awaitable of the worker's next batch, as `ModelWorker.begin`/`more` would return it.
"""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayActorError

from site_agent.ray_pool import RayWorkerHandle
from site_agent.slots import WorkerDied


class _Method:
    def __init__(self, actor: FakeActor, name: str) -> None:
        self._actor, self._name = actor, name

    def remote(self, *args: object) -> asyncio.Future:
        self._actor.calls.append(self._name)
        future = asyncio.get_running_loop().create_future()
        if self._name == "abandon":
            future.set_result(None)
        else:
            answer = self._actor.batches.pop(0)
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)
        return future


class FakeActor:
    def __init__(self, *batches: object) -> None:
        self.batches = list(batches)
        self.calls: list[str] = []
        self.begin = _Method(self, "begin")
        self.more = _Method(self, "more")
        self.abandon = _Method(self, "abandon")


async def _collect(handle: RayWorkerHandle) -> list[tuple]:
    return [item async for item in handle.execute(b"payload", True, "{}")]


DONE = ("done", {"total_bytes": 3}, b"abc")


def test_a_job_that_ends_in_the_first_call_takes_one_call() -> None:
    actor = FakeActor([("running",), DONE])
    items = asyncio.run(_collect(RayWorkerHandle(actor)))
    assert items == [("running",), DONE]  # RUNNING once, announced by the agent
    assert actor.calls == ["begin"]


def test_the_next_call_goes_out_before_a_batch_is_relayed() -> None:
    actor = FakeActor([("running",), ("log", "hi")], [], [("chunk", b"x"), DONE])

    async def main() -> list[str]:
        seen = []
        async for item in RayWorkerHandle(actor).execute(b"p", False, "{}"):
            seen.append(f"{item[0]} after {len(actor.calls)} calls")
        return seen

    assert asyncio.run(main()) == [
        "running after 1 calls",
        "log after 2 calls",  # `more` was already asked when the line was relayed
        "chunk after 3 calls",  # an empty batch (nothing new within the long poll) asks again
        "done after 3 calls",
    ]
    assert actor.calls == ["begin", "more", "more"]


def test_a_stream_closed_early_abandons_the_job_on_the_worker() -> None:
    actor = FakeActor([("running",), ("chunk", b"x")], [("chunk", b"y")])

    async def main() -> None:
        stream = RayWorkerHandle(actor).execute(b"p", False, "{}")
        assert await anext(stream) == ("running",)
        assert await anext(stream) == ("chunk", b"x")
        await stream.aclose()

    asyncio.run(main())
    assert actor.calls == ["begin", "more", "abandon"]


def test_an_ended_job_is_not_abandoned() -> None:
    actor = FakeActor([("running",), ("error", "USER", "boom")])
    assert asyncio.run(_collect(RayWorkerHandle(actor)))[-1] == ("error", "USER", "boom")
    assert actor.calls == ["begin"]


def test_a_dead_worker_is_worker_died() -> None:
    actor = FakeActor(RayActorError())
    with pytest.raises(WorkerDied):
        asyncio.run(_collect(RayWorkerHandle(actor)))
    assert actor.calls == ["begin"]  # nothing more asked of a dead actor


def test_a_time_limit_cancels_the_wait_without_calling_the_worker_again() -> None:
    """The executor's time limit cancels the pending call; it then replaces the worker."""
    actor = FakeActor([("running",), ("log", "still going")])

    async def main() -> None:
        stream = RayWorkerHandle(actor).execute(b"p", True, "{}")
        await anext(stream)  # RUNNING
        actor.more = _Never(actor)
        await anext(stream)  # the log line; `more` is in flight, and never answers
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(stream), 0.05)

    asyncio.run(main())
    assert actor.calls == ["begin", "more"]


class _Never:
    """A method whose calls never answer (a job that runs past its limit)."""

    def __init__(self, actor: FakeActor) -> None:
        self._actor = actor

    def remote(self, *args: object) -> asyncio.Future:
        self._actor.calls.append("more")
        return asyncio.get_running_loop().create_future()
