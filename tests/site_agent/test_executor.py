"""PoolExecutor with fake workers: queueing, time limits, worker loss, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from proto import site_agent_pb2 as pb
from site_agent.config import ModelConfig, SiteConfig
from site_agent.executor import JobSpec, PoolExecutor
from site_agent.hardware import DetectedHardware
from site_agent.slots import SlotState, WorkerDied

GPT2 = ModelConfig(repo_id="edif-demo/tiny-gpt2", source="/nonexistent")


class FakeWorker:
    """Plays a script: payload b"ok" completes, b"slow" hangs, b"die" loses the worker."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.killed = False

    async def execute(self, payload: bytes, compress: bool, env_json: str) -> AsyncIterator[tuple]:
        yield ("running",)
        if payload == b"slow":
            while not self.killed:
                await asyncio.sleep(0.01)
            raise WorkerDied("killed")
        if payload == b"die":
            raise WorkerDied("ActorDiedError")
        yield ("log", f"worker {self.number}")
        if payload == b"folded":  # a buffered result's last chunk rides on "done"
            yield ("chunk", b"ab")
            yield ("done", {"total_bytes": 3, "sha256": "x", "execution_s": 0.01}, b"c")
            return
        yield ("chunk", b"abc")
        yield ("done", {"total_bytes": 3, "sha256": "x", "execution_s": 0.01})

    def kill(self) -> None:
        self.killed = True


class FakeFactory:
    def __init__(self, fail: bool = False) -> None:
        self.started: list[FakeWorker] = []
        self.fail = fail

    async def start(self, cfg: ModelConfig) -> FakeWorker:
        if self.fail:
            raise RuntimeError("no such weights")
        worker = FakeWorker(len(self.started))
        self.started.append(worker)
        return worker


def make_executor(factory: FakeFactory, limit: float = 5.0) -> PoolExecutor:
    cfg = SiteConfig(site="test-site", models=[GPT2], limits={"execution_time_s": limit})
    return PoolExecutor(cfg, factory, DetectedHardware("cpu", "CPU", 1, 1 << 30))


def job(payload: bytes, job_id: str = "j1", limit: float = 0.0) -> JobSpec:
    return JobSpec(job_id, GPT2.model_key, payload, False, "{}", limit)


async def collect(executor: PoolExecutor, spec: JobSpec) -> list[pb.ExecuteUpdate]:
    return [u async for u in executor.execute(spec)]


def kinds(updates: list[pb.ExecuteUpdate]) -> list[str]:
    return [u.WhichOneof("update") for u in updates]


async def test_job_streams_status_log_chunks_and_end() -> None:
    executor = make_executor(FakeFactory())
    await executor.start()
    updates = await collect(executor, job(b"ok"))
    assert kinds(updates) == ["status", "log", "chunk", "done"]
    assert updates[0].status.phase == pb.RUNNING  # the worker was free: no QUEUED first
    assert updates[2].chunk.data == b"abc"
    assert executor.slots[GPT2.model_key].recent_execution_s > 0


async def test_a_chunk_riding_on_done_goes_out_before_the_end() -> None:
    executor = make_executor(FakeFactory())
    await executor.start()
    updates = await collect(executor, job(b"folded"))
    assert kinds(updates)[-3:] == ["chunk", "chunk", "done"]
    assert b"".join(u.chunk.data for u in updates if u.HasField("chunk")) == b"abc"


async def test_unknown_model_is_refused() -> None:
    executor = make_executor(FakeFactory())
    await executor.start()
    spec = JobSpec("j", "nnsight.x:{}", b"ok", False)
    updates = await collect(executor, spec)
    assert kinds(updates) == ["error"] and updates[0].error.kind == pb.REFUSED


async def test_time_limit_ends_job_and_replaces_worker() -> None:
    factory = FakeFactory()
    executor = make_executor(factory)
    await executor.start()
    updates = await collect(executor, job(b"slow", limit=0.2))
    assert updates[-1].error.kind == pb.TIMEOUT
    assert "time limit of 0.2 s" in updates[-1].error.description
    assert factory.started[0].killed
    # The next job runs on the replacement worker.
    updates = await collect(executor, job(b"ok", "j2"))
    assert updates[-1].HasField("done")
    assert "worker 1" in updates[2].log.text


async def test_worker_death_is_reported_and_recovered() -> None:
    factory = FakeFactory()
    executor = make_executor(factory)
    await executor.start()
    updates = await collect(executor, job(b"die"))
    assert updates[-1].error.kind == pb.WORKER_LOST
    assert (await collect(executor, job(b"ok", "j2")))[-1].HasField("done")
    assert len(factory.started) == 2


async def test_jobs_queue_in_order_with_positions() -> None:
    executor = make_executor(FakeFactory())
    await executor.start()
    results = await asyncio.gather(*(collect(executor, job(b"ok", f"j{i}")) for i in range(3)))
    first = [(r[0].status.phase, r[0].status.position) for r in results]
    assert first == [(pb.RUNNING, 0), (pb.QUEUED, 1), (pb.QUEUED, 2)]
    assert all(r[-1].HasField("done") for r in results)


async def test_a_job_waiting_for_its_worker_to_start_hears_queued() -> None:
    factory = FakeFactory()
    executor = make_executor(factory)
    starting = asyncio.create_task(executor.start())  # still loading when the job arrives
    updates = await collect(executor, job(b"ok"))
    await starting
    assert updates[0].status.phase == pb.QUEUED and updates[1].status.phase == pb.RUNNING


async def test_cancel_running_job_frees_the_worker() -> None:
    factory = FakeFactory()
    executor = make_executor(factory)
    await executor.start()
    task = asyncio.create_task(collect(executor, job(b"slow", "victim")))
    await asyncio.sleep(0.05)
    assert await executor.cancel("victim")
    updates = await task
    assert updates[-1].error.kind == pb.CANCELLED
    assert (await collect(executor, job(b"ok", "next")))[-1].HasField("done")
    assert not await executor.cancel("unknown-job")


async def test_failed_load_marks_model_unhealthy() -> None:
    executor = make_executor(FakeFactory(fail=True))
    await executor.start()
    slot = executor.slots[GPT2.model_key]
    assert slot.state is SlotState.UNHEALTHY
    updates = await collect(executor, job(b"ok"))
    assert updates[-1].error.kind == pb.WORKER_LOST
    assert "no such weights" in updates[-1].error.description
    described = executor.describe()
    assert described.models[0].state == "UNHEALTHY"


def test_requested_time_limit_is_capped_by_the_site_and_junk_ignored() -> None:
    from site_agent.executor import _effective_limit

    assert _effective_limit(0.0, 300.0) == 300.0
    assert _effective_limit(10.0, 300.0) == 10.0
    assert _effective_limit(1e300, 300.0) == 300.0
    assert _effective_limit(float("nan"), 300.0) == 300.0
    assert _effective_limit(float("inf"), 300.0) == 300.0
    assert _effective_limit(-1.0, 300.0) == 300.0


async def test_contaminated_worker_is_replaced_even_if_the_caller_stops_reading() -> None:
    class Tainting(FakeWorker):
        async def execute(self, payload, compress, env_json):
            yield ("running",)
            yield ("error", "USER", "the job changed torch.save", True)

    class TaintFactory(FakeFactory):
        async def start(self, cfg):
            worker = (Tainting if not self.started else FakeWorker)(len(self.started))
            self.started.append(worker)
            return worker

    factory = TaintFactory()
    executor = make_executor(factory)
    await executor.start()
    stream = executor.execute(job(b"ok", "tainting"))
    async for update in stream:
        if update.HasField("error"):
            break  # like the broker: stop at the terminal update
    await stream.aclose()
    assert factory.started[0].killed
    updates = await collect(executor, job(b"ok", "next-user"))
    assert updates[-1].HasField("done") and "worker 1" in updates[2].log.text


async def test_describe_shows_the_versioned_code_policy() -> None:
    import json

    executor = make_executor(FakeFactory())
    policy = executor.describe().policy
    assert (policy.name, policy.version) == ("edif-default", 1)
    described = json.loads(policy.describe_json)
    assert "torch" in described["import_roots"] and "os" not in described["import_roots"]
