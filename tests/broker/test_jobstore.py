"""The job store contract, run against SQLite (a file, WAL) and a real PostgreSQL 16.

PostgreSQL comes from `pgserver` (the server binaries as a wheel), started once per module in
a temporary directory and talked to over its Unix socket; nothing outside the machine is used.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest
from broker_fakes import GPT2_KEY

from broker.jobs import Job, JobState, Submission
from broker.jobstore.base import JobStore
from broker.jobstore.postgres import PostgresJobStore
from broker.jobstore.records import to_job, to_record
from broker.jobstore.sqlite import SqliteJobStore
from broker.modelkey import parse_model_key
from broker.results import ResultRef
from broker.wire import StatusMessage, WireStatus

LEASE_S = 10.0


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """`open_store()` -> a store on the same database each call (a 'restarted' broker)."""
    opened: list[JobStore] = []
    if request.param == "postgres":
        uri = request.getfixturevalue("postgres_uri")
        fresh = PostgresJobStore(uri)
        with fresh._transaction() as cursor:  # each test starts from empty tables
            cursor.execute("DELETE FROM edif_jobs")
            cursor.execute("DELETE FROM edif_brokers")
        fresh.close()

    def build() -> JobStore:
        if request.param == "sqlite":
            store: JobStore = SqliteJobStore(tmp_path / "jobs.sqlite3")
        else:
            store = PostgresJobStore(uri)
        opened.append(store)
        return store

    yield build
    for store in opened:
        store.close()


def make_job(job_id: str = "job-1", state: JobState = JobState.RECEIVED) -> Job:
    submission = Submission(
        model_key=parse_model_key(GPT2_KEY),
        raw_model_key=GPT2_KEY,
        compress=True,
        env_json='{"python": "3.11"}',
        session_id="sess-1",
        client_version="0.8.1",
        base_url="http://broker.test",
    )
    job = Job(
        id=job_id,
        owner_sub="alice@example.org",
        owner_pseudonym="u-alice",
        submission=submission,
        created_at=1000.0,
        owner_groups=("fau", "project-x"),
        payload=b"\x80\x04payload",
        state=state,
    )
    job.record(StatusMessage(id=job_id, status=WireStatus.RECEIVED, description="received"))
    return job


def test_a_job_round_trips_with_its_payload(open_store) -> None:
    store = open_store()
    job = make_job()
    store.create(to_record(job), job.payload, "a", 1000.0)
    back = to_job(store.get("job-1"), store.payload("job-1"))
    assert (back.id, back.state, back.owner_sub, back.owner_pseudonym) == (
        "job-1",
        JobState.RECEIVED,
        "alice@example.org",
        "u-alice",
    )
    assert back.submission == job.submission
    assert back.owner_groups == ("fau", "project-x")
    assert back.payload == job.payload
    assert back.latest == job.latest
    assert store.get("nope") is None and store.payload("nope") is None


def test_finishing_drops_the_payload_and_the_owner_sub(open_store) -> None:
    store = open_store()
    job = make_job()
    store.create(to_record(job), job.payload, "a", 1000.0)
    job.advance(JobState.QUEUED, 1.0)
    job.advance(JobState.DISPATCHED, 2.0)
    job.site, job.attempts = "site-a", ["site-a"]
    job.advance(JobState.COMPLETED, 3.0)
    job.result = ResultRef("job-1", 5, "ab" * 32, "tok", 5000.0)
    job.meta = {"execution_s": 0.5}
    job.record(StatusMessage(id="job-1", status=WireStatus.COMPLETED, data="http://x/r"))
    assert store.save(to_record(job), "a", 1010.0)
    back = to_job(store.get("job-1"), store.payload("job-1"))
    assert back.state is JobState.COMPLETED and back.site == "site-a"
    assert back.result == job.result and back.meta == {"execution_s": 0.5}
    assert back.latest.data == "http://x/r"
    assert store.payload("job-1") is None
    assert back.owner_sub == "" and back.owner_pseudonym == "u-alice"


def test_a_restarted_instance_claims_its_own_unfinished_jobs_only(open_store) -> None:
    store = open_store()
    for job_id, state in [("open-1", JobState.QUEUED), ("open-2", JobState.RUNNING)]:
        store.create(to_record(make_job(job_id, state)), b"p", "a", 1000.0)
    done = make_job("done", JobState.ERROR)
    store.create(to_record(done), b"p", "a", 1000.0)
    store.heartbeat("a", 1000.0)

    restarted = open_store()
    restarted.heartbeat("a", 1001.0)
    assert restarted.claim_orphans("a", 1001.0, LEASE_S, include_own=False) == []
    claimed = restarted.claim_orphans("a", 1001.0, LEASE_S, include_own=True)
    assert sorted(r.id for r in claimed) == ["open-1", "open-2"]
    assert {r.state for r in claimed} == {JobState.QUEUED, JobState.RUNNING}
    assert restarted.payload("open-1") == b"p"


def test_a_live_peer_keeps_its_jobs_and_a_dead_one_loses_them(open_store) -> None:
    store = open_store()
    store.create(to_record(make_job("peer-job", JobState.RUNNING)), b"p", "a", 1000.0)
    store.heartbeat("a", 1000.0)
    store.heartbeat("b", 1000.0)
    assert store.claim_orphans("b", 1000.0 + LEASE_S - 1, LEASE_S, include_own=True) == []
    claimed = store.claim_orphans("b", 1000.0 + LEASE_S + 1, LEASE_S, include_own=False)
    assert [r.id for r in claimed] == ["peer-job"]
    # Fencing: the presumed-dead instance can no longer write the job.
    assert not store.save(to_record(make_job("peer-job", JobState.COMPLETED)), "a", 1020.0)
    assert store.save(to_record(make_job("peer-job", JobState.COMPLETED)), "b", 1020.0)
    assert store.get("peer-job").state is JobState.COMPLETED


def test_an_instance_that_never_heartbeat_is_an_orphan_owner(open_store) -> None:
    store = open_store()
    store.create(to_record(make_job("lost", JobState.DISPATCHED)), b"p", "gone", 1000.0)
    store.heartbeat("b", 1000.0)
    claimed = store.claim_orphans("b", 1000.0, LEASE_S, include_own=False)
    assert [r.id for r in claimed] == ["lost"]
    assert store.claim_orphans("c", 1000.0, LEASE_S, include_own=False) == []  # b owns it now


def test_purge_removes_only_finished_jobs_past_the_horizon(open_store) -> None:
    store = open_store()
    store.create(to_record(make_job("old-done", JobState.COMPLETED)), b"", "a", 1000.0)
    store.create(to_record(make_job("new-done", JobState.ERROR)), b"", "a", 2000.0)
    store.create(to_record(make_job("old-open", JobState.QUEUED)), b"p", "a", 1000.0)
    assert store.purge(1500.0) == 1
    assert store.get("old-done") is None
    assert store.get("new-done") is not None and store.get("old-open") is not None
    assert store.counts() == {"ERROR": 1, "QUEUED": 1}


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path) -> None:
    path = tmp_path / "jobs.sqlite3"
    SqliteJobStore(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_recorded_job_survives_sigkill_of_the_writer(tmp_path) -> None:
    """What `create` returned from is on disk even if the process dies the next instant."""
    path = tmp_path / "jobs.sqlite3"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path[:0] = {json.dumps(sys.path)}
        from broker.jobstore.records import to_record
        from broker.jobstore.sqlite import SqliteJobStore
        from test_jobstore import make_job
        store = SqliteJobStore({str(path)!r})
        for i in range(20):
            store.create(to_record(make_job(f"job-{{i}}")), b"p" * 1000, "a", 1000.0)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=60)
    assert proc.returncode == -9
    store = SqliteJobStore(path)
    assert store.counts() == {"RECEIVED": 20}
    assert store.payload("job-19") == b"p" * 1000
    store.close()


async def test_a_save_not_waited_for_lands_before_a_later_save(tmp_path) -> None:
    """`DurableJobs.save_soon` (QUEUED, RUNNING): the record is taken when it is called, and
    the store writes it before anything recorded after it."""
    from broker.jobstore import DurableJobs
    from edif.clock import FakeClock

    jobs = DurableJobs(SqliteJobStore(tmp_path / "jobs.sqlite3"), "a", FakeClock(), LEASE_S)
    job = make_job()
    await jobs.create(job)
    job.advance(JobState.QUEUED, 1.0)
    queued = jobs.save_soon(job)
    job.advance(JobState.DISPATCHED, 2.0)  # changed after the call: the write must not see it
    assert await queued is True
    assert (await jobs.load(job.id)).state is JobState.QUEUED
    job.advance(JobState.RUNNING, 3.0)
    running = jobs.save_soon(job)
    job.advance(JobState.COMPLETED, 4.0)
    assert await jobs.save(job) is True  # awaited after the unawaited one: lands last
    assert await running is True
    assert (await jobs.load(job.id)).state is JobState.COMPLETED
    await jobs.close()
