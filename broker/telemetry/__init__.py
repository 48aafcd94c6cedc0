"""The broker's telemetry: traces per job, `edif_*` metrics, the hooks that feed them.

`BrokerTelemetry` is the `JobObserver` the job service reports to and the source of the
`SiteCallObserver` the gRPC site client uses: it fans each event out to `JobTraces` (spans)
and `BrokerMetrics` (instruments), and remembers what a site reported about a failed job so
errors are counted by kind. `BrokerTelemetry.from_settings` builds the process's providers
(Prometheus text for `GET /metrics`, spans to a JSON-lines file when one is configured);
tests pass a `Telemetry` with in-memory exporters instead. Routes: `broker.telemetry.http`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from broker.jobs import Job, JobState
from broker.telemetry.metrics import METRICS, BrokerMetrics, error_kind
from broker.telemetry.observer import NO_SITE_CALL, JobObserver, SiteCallObserver
from broker.telemetry.tracing import JobTraces
from edif.telemetry import JsonLinesSpanExporter, Telemetry, headers_for
from proto import site_agent_pb2 as pb

__all__ = [
    "METRICS",
    "NO_SITE_CALL",
    "BrokerTelemetry",
    "JobObserver",
    "SiteCallObserver",
]


class BrokerTelemetry(JobObserver):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.traces = JobTraces(telemetry.tracer("edif.broker"))
        self.metrics = BrokerMetrics(telemetry.meter("edif.broker"))
        self._site_kinds: dict[str, str] = {}  # job id -> the kind of error its site reported
        self._kinds: dict[str, str] = {}  # job id -> the kind of error that ended it

    @classmethod
    def from_settings(cls, traces_file: Path | None = None) -> BrokerTelemetry:
        exporter = JsonLinesSpanExporter(traces_file) if traces_file else None
        return cls(Telemetry.create("edif-broker", span_exporter=exporter))

    def watch(
        self,
        sites: Callable[[], Mapping[str, bool]] | None = None,
        result_store: Path | None = None,
    ) -> None:
        """Read at each scrape: sites' reachability, and the disk the results live on."""
        if sites is not None:
            self.metrics.watch_sites(sites)
        if result_store is not None:
            self.metrics.watch_result_store(result_store)

    # -- JobObserver --------------------------------------------------------------------------

    def received(self, job: Job) -> None:
        self.traces.received(job)
        self.metrics.received(job)

    def advanced(self, job: Job, state: JobState) -> None:
        self.traces.advanced(job, state)
        self.metrics.advanced(job, state)

    def delivering(self, job: Job, inline: bool) -> None:
        self.traces.delivering(job, inline)

    def failed(self, job: Job, error: BaseException) -> None:
        self._kinds[job.id] = error_kind(error, self._site_kinds.get(job.id))

    def ended(self, job: Job) -> None:
        self._site_kinds.pop(job.id, None)
        kind = self._kinds.pop(job.id, None)
        self.traces.ended(job, kind)
        self.metrics.ended(job, kind)

    def refused(self, error: BaseException) -> None:
        self.metrics.refused(error_kind(error))

    def site_call(self, job_id: str, site: str) -> SiteCallObserver:
        return _SiteCall(self, job_id, site)

    def site_reported(self, job_id: str, kind: str) -> None:
        self._site_kinds[job_id] = kind


class _SiteCall(SiteCallObserver):
    """One Execute call: sends the dispatch span's context, times the result's arrival."""

    def __init__(self, owner: BrokerTelemetry, job_id: str, site: str) -> None:
        self._owner = owner
        self._job_id = job_id
        self._site = site
        self._bytes = 0
        self._receiving = False

    def headers(self) -> tuple[tuple[str, str], ...]:
        return headers_for(self._owner.traces.dispatch_context(self._job_id))

    def update(self, update: pb.ExecuteUpdate) -> None:
        kind = update.WhichOneof("update")
        if kind == "chunk":
            if not self._receiving:
                self._receiving = True
                self._owner.traces.result_from_site(self._job_id, self._site)
            self._bytes += len(update.chunk.data)
        elif kind == "done":
            if not self._receiving:  # an empty result: no chunk came before ResultEnd
                self._owner.traces.result_from_site(self._job_id, self._site)
            self._receiving = False
            self._owner.traces.result_received(self._job_id, self._bytes, complete=True)
        elif kind == "error":
            self._owner.site_reported(self._job_id, pb.ErrorKind.Name(update.error.kind).lower())

    def close(self) -> None:
        if self._receiving:
            self._receiving = False
            self._owner.traces.result_received(self._job_id, self._bytes, complete=False)
