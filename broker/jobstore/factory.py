"""Choosing the job store from the broker settings (validated once, at start)."""

from __future__ import annotations

import socket

from broker.config import BrokerSettings
from broker.jobstore.base import JobStore
from broker.jobstore.durable import DurableJobs
from broker.jobstore.sqlite import SqliteJobStore
from edif.clock import Clock, SystemClock
from edif.errors import ConfigError


def open_job_store(settings: BrokerSettings, clock: Clock) -> DurableJobs:
    store: JobStore
    if settings.job_store == "postgres":
        if settings.job_store_dsn is None:
            raise ConfigError(
                "EDIF_BROKER_JOB_STORE=postgres needs EDIF_BROKER_JOB_STORE_DSN "
                "(e.g. postgresql://edif@db.example/edif)"
            )
        from broker.jobstore.postgres import PostgresJobStore

        store = PostgresJobStore(settings.job_store_dsn.get_secret_value())
    else:
        path = settings.job_db or settings.data_dir / "jobs.sqlite3"
        store = SqliteJobStore(path, settings.job_store_sync)
    instance = settings.instance_id or f"{socket.gethostname()}:{settings.port}"
    return DurableJobs(store, instance, clock, settings.job_lease_s)


def memory_jobs(clock: Clock | None = None) -> DurableJobs:
    """A store that lives as long as the process (tests of other parts, in-process demos)."""
    return DurableJobs(SqliteJobStore(":memory:"), "memory", clock or SystemClock(), 15.0)
