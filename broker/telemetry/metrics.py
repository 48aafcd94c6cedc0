"""The broker's `edif_*` metrics (OpenTelemetry instruments, exported for Prometheus).

`METRICS` names every series this module creates, with its help text: the dashboards and
alerts in deploy/observability may use these and nothing else (a test checks). Labels are
low-cardinality and never about users: `status`, `kind` (an error class), `site` (a joined
site's name), `outcome`. Jobs' times are measured here with a monotonic clock, so a fake clock
in the service does not distort them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from broker.jobs import Job, JobState
from edif.telemetry import BYTES_BUCKETS, SECONDS_BUCKETS

METRICS: dict[str, str] = {
    "edif_jobs_received_total": "Jobs accepted (answered RECEIVED).",
    "edif_jobs_total": "Jobs that ended, by status (completed, error, refused, handed_over).",
    "edif_jobs_in_flight": "Jobs accepted and not ended.",
    "edif_queue_depth": "Jobs waiting at the broker for a site (RECEIVED or QUEUED).",
    "edif_queue_wait_seconds": "Time a job waited at the broker before each dispatch.",
    "edif_dispatch_attempts_total": "Dispatches to a site, by site and outcome.",
    "edif_execution_seconds": "Execution time of completed jobs, as the site measured it.",
    "edif_job_duration_seconds": "Time from RECEIVED to the end, by status.",
    "edif_result_bytes": "Size of completed jobs' results, by site.",
    "edif_result_download_bytes_total": "Result bytes sent to clients by GET /results.",
    "edif_errors_total": "Jobs that ended with ERROR, by kind.",
    "edif_refusals_total": "Submissions refused at admission, by kind.",
    "edif_site_up": "1 while the site answers Describe, else 0.",
    "edif_result_store_bytes": "Bytes held in the result store.",
    "edif_result_store_free_bytes": "Free bytes on the result store's file system.",
    "edif_result_store_capacity_bytes": "Size of the result store's file system.",
}


def error_kind(error: BaseException, site_kind: str | None = None) -> str:
    """A label for an error: its class in snake case; a site's report names the site's kind."""
    name = type(error).__name__
    if name == "SiteJobError" and site_kind:
        return f"site_{site_kind}"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass
class _Live:
    received_at: float
    waiting_since: float | None = None
    attempt_site: str | None = None


class BrokerMetrics:
    def __init__(self, meter: Meter) -> None:
        def counter(name: str):
            return meter.create_counter(name, description=METRICS[name])

        def histogram(name: str, unit: str, buckets: Iterable[float]):
            return meter.create_histogram(
                name,
                unit=unit,
                description=METRICS[name],
                explicit_bucket_boundaries_advisory=list(buckets),
            )

        self._received = counter("edif_jobs_received_total")
        self._jobs = counter("edif_jobs_total")
        self._in_flight = meter.create_up_down_counter(
            "edif_jobs_in_flight", description=METRICS["edif_jobs_in_flight"]
        )
        self._queue_depth = meter.create_up_down_counter(
            "edif_queue_depth", description=METRICS["edif_queue_depth"]
        )
        self._queue_wait = histogram("edif_queue_wait_seconds", "s", SECONDS_BUCKETS)
        self._attempts = counter("edif_dispatch_attempts_total")
        self._execution = histogram("edif_execution_seconds", "s", SECONDS_BUCKETS)
        self._duration = histogram("edif_job_duration_seconds", "s", SECONDS_BUCKETS)
        self._result_bytes = histogram("edif_result_bytes", "By", BYTES_BUCKETS)
        self._downloaded = counter("edif_result_download_bytes_total")
        self._errors = counter("edif_errors_total")
        self._refusals = counter("edif_refusals_total")
        self._sites: Callable[[], Mapping[str, bool]] = dict
        self._store: Path | None = None
        self._usage: tuple[float, tuple[int, int, int]] | None = None
        meter.create_observable_gauge(
            "edif_site_up", [self._observe_sites], description=METRICS["edif_site_up"]
        )
        for name, pick in (
            ("edif_result_store_bytes", lambda usage: usage[0]),
            ("edif_result_store_free_bytes", lambda usage: usage[1]),
            ("edif_result_store_capacity_bytes", lambda usage: usage[2]),
        ):
            meter.create_observable_gauge(
                name, [self._store_callback(pick)], unit="By", description=METRICS[name]
            )
        self._live: dict[str, _Live] = {}

    # -- what the wiring tells it --------------------------------------------------------------

    def watch_sites(self, reachable: Callable[[], Mapping[str, bool]]) -> None:
        """`reachable()` -> {site: answers Describe}, read at each scrape."""
        self._sites = reachable

    def watch_result_store(self, directory: Path) -> None:
        self._store = Path(directory)

    # -- job events ---------------------------------------------------------------------------

    def received(self, job: Job) -> None:
        self._live_of(job)

    def advanced(self, job: Job, state: JobState) -> None:
        live = self._live_of(job)
        now = time.monotonic()
        if state is JobState.QUEUED:
            self._end_attempt(live, "site_failed")
            if live.waiting_since is None:
                live.waiting_since = now
                self._queue_depth.add(1)
        elif state is JobState.DISPATCHED:
            self._leave_queue(live, now, dispatched=True)
            live.attempt_site = job.site or "none"

    def ended(self, job: Job, kind: str | None) -> None:
        live = self._live.pop(job.id, None)
        if live is None:
            return
        status = job.state.value.lower() if job.state.terminal else "handed_over"
        self._leave_queue(live, time.monotonic(), dispatched=False)
        self._end_attempt(live, status)
        self._in_flight.add(-1)
        self._jobs.add(1, {"status": status})
        self._duration.record(time.monotonic() - live.received_at, {"status": status})
        if job.state is JobState.ERROR:
            self._errors.add(1, {"kind": kind or "broker"})
        if job.state is JobState.COMPLETED:
            site = {"site": job.site or "none"}
            if "execution_s" in job.meta:
                self._execution.record(float(job.meta["execution_s"]), site)
            if job.result is not None:
                self._result_bytes.record(job.result.size, site)

    def refused(self, kind: str) -> None:
        self._jobs.add(1, {"status": "refused"})
        self._refusals.add(1, {"kind": kind})

    def downloaded(self, sent: int) -> None:
        self._downloaded.add(sent)

    # -- helpers ------------------------------------------------------------------------------

    def _live_of(self, job: Job) -> _Live:
        live = self._live.get(job.id)
        if live is None:  # received here, or recovered from an earlier broker instance
            live = self._live[job.id] = _Live(received_at=time.monotonic())
            self._received.add(1)
            self._in_flight.add(1)
            if job.state in (JobState.RECEIVED, JobState.QUEUED):
                live.waiting_since = live.received_at
                self._queue_depth.add(1)
        return live

    def _leave_queue(self, live: _Live, now: float, dispatched: bool) -> None:
        if live.waiting_since is None:
            return
        if dispatched:
            self._queue_wait.record(now - live.waiting_since)
        live.waiting_since = None
        self._queue_depth.add(-1)

    def _end_attempt(self, live: _Live, outcome: str) -> None:
        if live.attempt_site is not None:
            self._attempts.add(1, {"site": live.attempt_site, "outcome": outcome})
            live.attempt_site = None

    def _observe_sites(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(int(up), {"site": name}) for name, up in self._sites().items()]

    def _store_callback(self, pick: Callable[[tuple[int, int, int]], int]):
        def observe(options: CallbackOptions) -> list[Observation]:
            usage = self._store_usage()
            return [Observation(pick(usage))] if usage is not None else []

        return observe

    def _store_usage(self) -> tuple[int, int, int] | None:
        """Measured once per scrape (three gauges read it; the walk is not free)."""
        if self._store is None or not self._store.exists():
            return None
        now = time.monotonic()
        if self._usage is None or now - self._usage[0] > 1.0:
            self._usage = (now, _store_usage(self._store))
        return self._usage[1]


def _store_usage(directory: Path) -> tuple[int, int, int]:
    """(bytes under `directory`, free bytes, capacity) of its file system."""
    held = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile (expiry, a finished upload)
                held += os.stat(os.path.join(root, name)).st_size
    disk = shutil.disk_usage(directory)
    return held, disk.free, disk.total
