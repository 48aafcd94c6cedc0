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

With `background=True` (the broker's wiring) entries go to one writer thread, in call order,
which writes them in batches: it waits `window_s` (0.2 s) after an entry arrives, then appends
everything queued in one transaction with one signed head (`AuditLog.append_many`). One append
fsyncs twice and re-signs the chain head; done per entry, that ran on the writer thread in the
middle of every job and cost the next client ~3 ms of its ~40 (docs/benchmarks.md section 10),
and under load it would be two fsyncs per job. An entry is written at most `window_s` after its
event, later than before, and an entry still queued when the broker dies is lost either way.
`close()` writes what is queued and stops the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
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


BATCH_WINDOW_S = 0.2
_STOP = object()


class JobAuditor:
    def __init__(
        self,
        audit: AuditLog | None = None,
        *,
        background: bool = False,
        window_s: float = BATCH_WINDOW_S,
    ) -> None:
        self.log: AuditLog = audit or NullAuditLog()
        self._live: dict[str, _Live] = {}
        self._window_s = window_s
        # One writer thread keeps entries in call order (the chain is sequential anyway).
        self._queue: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        if background:
            self._queue = queue.Queue()
            self._writer = threading.Thread(target=self._write_batches, name="edif-audit")
            self._writer.daemon = True
            self._writer.start()

    def close(self) -> None:
        """Write every queued entry, then stop the writer thread. Idempotent."""
        if self._writer is not None:
            assert self._queue is not None
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None

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
            assert self._queue is not None
            self._queue.put((event, job_id))
        else:
            self._write([(event, job_id)])

    def _write_batches(self) -> None:
        """The writer thread: one batch per `window_s` at most, until `close`."""
        stopping = False
        while not stopping:
            batch, stopping = self._next_batch()
            if batch:
                self._write(batch)

    def _next_batch(self) -> tuple[list[tuple[AuditEvent, str | None]], bool]:
        """What arrives from the next entry on until `window_s` later; True once `close`d."""
        assert self._queue is not None
        batch: list[tuple[AuditEvent, str | None]] = []
        item = self._queue.get()
        deadline = time.monotonic() + self._window_s
        while item is not _STOP:
            batch.append(item)
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, False
        return batch, True

    def _write(self, batch: list[tuple[AuditEvent, str | None]]) -> None:
        try:
            self.log.append_many([event for event, _ in batch])
        except Exception:  # the jobs go on; the operator must see this
            what = ", ".join(f"{event.action} for job {job_id or '-'}" for event, job_id in batch)
            log.exception("audit: could not record %s", what)
