"""Durable jobs in the job service: a broker that dies loses nothing it had accepted.

Two `BrokerService` instances share one SQLite job store, as a crashed broker and its
replacement (or two replicas) do. The first one is never closed before the second takes over:
that is what a crash looks like from the store's side. A fake clock moves the first instance's
lease past its end.
"""

from __future__ import annotations

import json

import pytest
import torch
from broker_fakes import (
    GPT2_KEY,
    HANG,
    RESULT,
    SITES,
    FakeIdentity,
    FakeSiteClient,
    describe,
    load_result,
    settings_for,
)

from broker.catalog import SiteCatalog
from broker.jobs import JobState
from broker.jobstore import DurableJobs, SqliteJobStore
from broker.jobstore.postgres import PostgresJobStore
from broker.results import DiskResultStore
from broker.service import BrokerService
from edif.clock import FakeClock
from edif.errors import NotFound, Unavailable

ALICE = FakeIdentity("alice@example.org")
BOB = FakeIdentity("bob@example.org")
LEASE_S = 10.0


def fake_sites() -> FakeSiteClient:
    return FakeSiteClient({"site-a": describe("site-a", GPT2_KEY), "site-b": describe("site-b")})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """`open_store()` -> a new connection to this test's shared job database."""
    if request.param == "sqlite":
        return lambda: SqliteJobStore(tmp_path / "jobs.sqlite3")
    uri = request.getfixturevalue("postgres_uri")
    fresh = PostgresJobStore(uri)
    with fresh._transaction() as cursor:
        cursor.execute("DELETE FROM edif_jobs")
        cursor.execute("DELETE FROM edif_brokers")
    fresh.close()
    return lambda: PostgresJobStore(uri)


@pytest.fixture
async def broker(tmp_path, clock, open_store):
    """`broker(instance, sites)` -> a started service on the shared store (closed at the end)."""
    started: list[BrokerService] = []
    settings = settings_for(tmp_path)

    async def build(instance: str, sites: FakeSiteClient, store=None) -> BrokerService:
        catalog = SiteCatalog(SITES, sites, settings.describe_refresh_s, settings.startup_wait_s)
        results = DiskResultStore(
            settings.data_dir / "results", clock, settings.result_ttl_s, settings.max_result_bytes
        )
        jobs = DurableJobs(store or open_store(), instance, clock, LEASE_S)
        service = BrokerService(
            settings, catalog, sites, results, lambda sub: "u-" + sub, clock, jobs=jobs
        )
        await service.start()
        started.append(service)
        return service

    yield build
    for service in started:
        await service.close()


async def submit(service: BrokerService, identity=ALICE) -> str:
    envelope = json.dumps({"model_key": GPT2_KEY, "session_id": "", "compress": False})
    reply = await service.submit(
        identity, envelope, b"blob", {"nnsight-version": "0.8.1"}, "http://broker.test/"
    )
    return reply.id


async def until_state(service: BrokerService, job_id: str, state: JobState) -> None:
    import asyncio

    for _ in range(200):
        job = service.job(job_id)
        if job is not None and job.state is state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} never reached {state}")


async def test_a_job_running_when_its_broker_died_completes_once_elsewhere(broker, clock):
    stuck = fake_sites()
    stuck.script("site-a", [HANG])
    stuck.script("site-b", [HANG])
    first = await broker("a", stuck)
    job_id = await submit(first)
    await until_state(first, job_id, JobState.DISPATCHED)
    ran_at = first.job(job_id).site

    clock.advance(LEASE_S + 1)  # the first broker is silent from now on: presumed dead
    healthy = fake_sites()
    second = await broker("b", healthy)
    await second.drain()

    status = await second.status_of(ALICE, job_id)
    assert status.status == "COMPLETED" and status.data.startswith("http://broker.test/results/")
    assert healthy.cancelled == [(ran_at, job_id)]  # the old run is stopped before the new one
    assert [request.job_id for _, request in healthy.executed] == [job_id]
    assert healthy.executed[0][1].payload == b"blob"  # the payload survived the crash
    token = second.job(job_id).result.token
    delivered = load_result(second.open_result(job_id, token).path.read_bytes())
    assert torch.equal(delivered["x"], load_result(RESULT)["x"])

    # The first broker wakes up: it may not finish (or fail) the job a second time.
    await first.close()
    assert (await second.status_of(ALICE, job_id)).status == "COMPLETED"
    with pytest.raises(NotFound):
        await second.status_of(BOB, job_id)


async def test_a_restart_resumes_its_own_queued_jobs_at_once(broker, tmp_path, clock):
    stuck = fake_sites()
    stuck.script("site-a", [HANG])
    stuck.script("site-b", [HANG])
    first = await broker("same", stuck)
    job_ids = [await submit(first) for _ in range(3)]
    for job_id in job_ids:
        await until_state(first, job_id, JobState.DISPATCHED)

    # Same instance id, lease still fresh: a restart of this very broker (no waiting).
    second = await broker("same", fake_sites())
    await second.drain()
    for job_id in job_ids:
        assert (await second.status_of(ALICE, job_id)).status == "COMPLETED"


async def test_finished_jobs_stay_answerable_after_a_restart(broker):
    first = await broker("a", fake_sites())
    job_id = await submit(first)
    await first.drain()
    before = await first.status_of(ALICE, job_id)
    await first.close()

    second = await broker("a", fake_sites())
    after = await second.status_of(ALICE, job_id)
    assert after == before and after.status == "COMPLETED"
    with pytest.raises(NotFound):
        await second.status_of(BOB, job_id)


class BrokenStore(SqliteJobStore):
    def create(self, record, payload, instance, now):
        raise OSError("disk full")


async def test_a_job_that_cannot_be_recorded_is_refused_and_never_runs(broker, tmp_path):
    sites = fake_sites()
    service = await broker("a", sites, store=BrokenStore(tmp_path / "broken.sqlite3"))
    with pytest.raises(Unavailable, match="could not record your job"):
        await submit(service)
    await service.drain()
    assert sites.executed == []
