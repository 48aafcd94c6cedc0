"""The broker's audit hooks: one call per job lifecycle point, turned into audit events.

`BrokerService` calls `submitted(job, role)` when it accepts a job, `refused(identity, size,
error)` when admission turns one away, and `ended(job)` when the job reaches COMPLETED or
ERROR. The auditor remembers each live job's role and payload size between submission and end
(the job record drops its payload when it finishes), and reads site, result bytes and
GPU-seconds (`execution_s`) from the job. What it records: pseudonymous user (via the log's
audit key), role, action, model repo id, site, bytes, GPU-seconds, outcome, time. Never the
payload, the token, an error description (it may quote the user's code) or the raw user id.

A failing audit write is logged as an error and does not fail the job: the chain stays whole
(seqs are assigned at write), and losing the job over its paperwork would help nobody.

With `background=True` (the broker's wiring) appends run on one writer thread in call order:
an append fsyncs and re-signs the chain head (~5 ms), which must not stall the event loop that
serves every client's websocket and POST. `close()` drains the queue at shutdown.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from broker.audit.model import AuditAction, AuditEvent
from broker.audit.store import AuditLog, NullAuditLog
from broker.jobs import Job, JobState
from broker.ports import Identity
from edif.errors import EdifError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Live:
    role: str
    bytes_in: int


class JobAuditor:
    def __init__(self, audit: AuditLog | None = None, *, background: bool = False) -> None:
        self.log: AuditLog = audit or NullAuditLog()
        self._live: dict[str, _Live] = {}
        # One writer thread keeps entries in call order (the chain is sequential anyway).
        self._writer = ThreadPoolExecutor(1, "edif-audit") if background else None

    def close(self) -> None:
        """Write every queued entry, then stop the writer thread."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    def submitted(self, job: Job, role: str) -> None:
        self._live[job.id] = _Live(role=str(role), bytes_in=len(job.payload))
        self._append(
            AuditEvent(
                action=AuditAction.JOB_SUBMIT,
                user=job.owner_sub,
                role=str(role),
                model=job.submission.model_key.repo_id,
                job_id=job.id,
                bytes_in=len(job.payload),
                outcome="accepted",
            ),
            job.id,
        )

    def refused(self, identity: Identity, payload_bytes: int, error: EdifError) -> None:
        self._append(
            AuditEvent(
                action=AuditAction.JOB_REFUSED,
                user=identity.sub,
                role=str(identity.role),
                bytes_in=payload_bytes,
                outcome=f"{type(error).__name__} ({error.http_status})",
            ),
            None,
        )

    def ended(self, job: Job) -> None:
        live = self._live.pop(job.id, None)
        completed = job.state is JobState.COMPLETED
        self._append(
            AuditEvent(
                action=AuditAction.JOB_COMPLETE if completed else AuditAction.JOB_ERROR,
                user=job.owner_sub,
                role=live.role if live else None,
                model=job.submission.model_key.repo_id,
                site=job.site,
                job_id=job.id,
                bytes_in=live.bytes_in if live else 0,
                bytes_out=int(job.meta.get("result_bytes", 0)),
                gpu_s=float(job.meta.get("execution_s", 0.0)),
                outcome="completed" if completed else "error",
            ),
            job.id,
        )

    def _append(self, event: AuditEvent, job_id: str | None) -> None:
        if self._writer is not None:
            self._writer.submit(self._write, event, job_id)
        else:
            self._write(event, job_id)

    def _write(self, event: AuditEvent, job_id: str | None) -> None:
        try:
            self.log.append(event)
        except Exception:  # the job goes on; the operator must see this
            log.exception("audit: could not record %s for job %s", event.action, job_id or "-")
