"""Durable job records for the broker (issue 5): nothing a client was told about is lost.

`records` translates jobs to rows, `base` holds the interface and shared SQL, `sqlite` and
`postgres` the two dialects, `durable` the asynchronous facade the service uses, and `open`
(`open_job_store`) picks one from the broker settings.
"""

from broker.jobstore.base import JobStore
from broker.jobstore.durable import DurableJobs
from broker.jobstore.factory import memory_jobs, open_job_store
from broker.jobstore.sqlite import SqliteJobStore

__all__ = ["DurableJobs", "JobStore", "SqliteJobStore", "memory_jobs", "open_job_store"]
