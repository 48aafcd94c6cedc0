"""The job service with fair-share queues, over fake sites whose jobs end when the test says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator

import pytest
from broker_fakes import (
    GPT2_KEY,
    SITES,
    FakeIdentity,
    FakeSiteClient,
    RecordingSink,
    decode,
    describe,
    error,
    result,
    settings_for,
    status,
)

from broker.catalog import SiteCatalog
from broker.fairshare import DecayedUsage, FairShareScheduler
from broker.results import DiskResultStore
from broker.service import BrokerService
from edif.clock import FakeClock
from proto import site_agent_pb2 as pb

HEAVY = FakeIdentity("heavy@example.org")
LIGHT = FakeIdentity("light@example.org")


class GatedSites(FakeSiteClient):
    """Each job reports RUNNING, then waits until the test `finish`es it (or fails it)."""

    def __init__(self, descriptions) -> None:
        super().__init__(descriptions)
        self.gates: dict[str, asyncio.Future] = {}

    async def execute(self, site: str, request: pb.ExecuteRequest) -> AsyncGenerator:
        self.executed.append((site, request))
        gate = self.gates.get(request.job_id)
        if gate is None or gate.done():  # a new attempt of the job
            gate = self.gates[request.job_id] = asyncio.get_running_loop().create_future()
        yield status(pb.RUNNING)
        for update in await gate:
            yield update

    def running(self) -> list[str]:
        return [job for job, gate in self.gates.items() if not gate.done()]

    def finish(self, job_id: str, updates=None) -> None:
        self.gates[job_id].set_result(result() if updates is None else updates)


@pytest.fixture
def sites() -> GatedSites:
    return GatedSites({"site-a": describe("site-a", GPT2_KEY), "site-b": describe("site-b")})


@pytest.fixture
async def setup(tmp_path, sites):
    clock = FakeClock()
    settings = settings_for(tmp_path, fair_share_position_interval_s=0.0)
    catalog = SiteCatalog(SITES, sites, settings.describe_refresh_s, settings.startup_wait_s)
    results = DiskResultStore(settings.data_dir / "results", clock, 3600.0, 2**30)
    fair = FairShareScheduler(DecayedUsage(3600.0, clock), catalog.max_concurrent_jobs, clock)
    service = BrokerService(
        settings,
        catalog,
        sites,
        results,
        lambda sub: "p-" + sub.split("@")[0],
        clock,
        fairshare=fair,
    )
    await service.start()
    yield service, fair
    await service.close()


async def submit(service, identity, sink: RecordingSink | None = None) -> str:
    session_id = await service.open_session(sink, identity) if sink is not None else ""
    envelope = json.dumps({"model_key": GPT2_KEY, "session_id": session_id, "compress": False})
    reply = await service.submit(
        identity, envelope, b"blob", {"nnsight-version": "0.8.1"}, "http://broker.test/"
    )
    return reply.id


async def until(condition, timeout: float = 3.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_a_light_users_job_overtakes_a_heavy_backlog(setup, sites) -> None:
    service, fair = setup
    heavy = [await submit(service, HEAVY) for _ in range(4)]
    await until(lambda: sites.running() == [heavy[0]])
    sink = RecordingSink()
    light = await submit(service, LIGHT, sink)
    await until(lambda: any("position 4 of 4" in decode(f).description for f in sink.frames))

    sites.finish(heavy[0])  # heavy used 0.25 GPU-seconds (the site's execution_s)
    await until(lambda: sites.running() == [light])
    assert fair.usage.usage("p-heavy") == pytest.approx(0.25)
    sites.finish(light)
    await until(lambda: sites.running() == [heavy[1]])
    for job in heavy[1:]:
        await until(lambda job=job: sites.running() == [job])
        sites.finish(job)
    await service.drain()

    order = [request.job_id for _, request in sites.executed]
    assert order == [heavy[0], light, *heavy[1:]]
    frames = [decode(f) for f in sink.frames]
    queued = [f.description for f in frames if f.status.value == "QUEUED"]
    assert "Your job is queued (position 4 of 4 for model openai-community/gpt2" in queued[1]
    assert frames[-1].status.value == "COMPLETED"
    assert (await service.status_of(LIGHT, light)).status == "COMPLETED"
    assert fair.busy("site-a") == 0 and fair.depths() == {}


async def test_the_polled_status_of_a_waiting_job_has_its_position(setup, sites) -> None:
    service, _ = setup
    first = await submit(service, HEAVY)
    await until(lambda: sites.running() == [first])
    second = await submit(service, LIGHT)
    await until(lambda: "position 1 of 1" in service.job(second).latest.description)
    assert (await service.status_of(LIGHT, second)).status == "QUEUED"
    # /status (and the dashboard) count it as waiting at the broker, per model.
    assert list(service.deployments()["broker_queue"].values()) == [1]
    sites.finish(first)
    await until(lambda: sites.running() == [second])
    sites.finish(second)
    await service.drain()


async def test_a_failed_over_job_queues_again_and_runs_elsewhere(setup, sites) -> None:
    service, fair = setup
    sites.descriptions["site-b"] = describe("site-b", GPT2_KEY)
    await service._catalog.refresh()
    job = await submit(service, LIGHT)
    await until(lambda: sites.running() == [job])
    lost = [error(pb.WORKER_LOST, "worker died")]
    first_site = sites.executed[0][0]
    sites.finish(job, lost)
    await until(lambda: len(sites.executed) == 2 and sites.running() == [job])
    assert sites.executed[1][0] != first_site
    sites.finish(job)
    await service.drain()
    assert service.job(job).state == "COMPLETED"
    assert service.job(job).attempts == [first_site, sites.executed[1][0]]
    assert fair.busy("site-a") == fair.busy("site-b") == 0
