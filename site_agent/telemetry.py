"""The site agent's telemetry: its part of each job's trace, and `edif_agent_*` metrics.

Per Execute call the servicer opens an `AgentJob` from the request and its gRPC metadata and
shows it every update it streams back. The job's spans continue the broker's trace (the W3C
`traceparent` the broker sent; a call without one starts a trace of its own):

    edif.site.execute             the whole call (attrs: job id, model, site, outcome)
    ├─ edif.site.queue_wait       until the job is handed to its model worker (RUNNING)
    ├─ edif.site.deserialize      ┐ measured in the worker process (a Ray actor) and reported
    ├─ edif.site.run              │ in ResultEnd; placed from RUNNING on, with explicit times
    ├─ edif.site.encode           ┘
    └─ edif.site.result_transfer  first result chunk -> ResultEnd, streamed to the broker

Metrics (`METRICS`) are labelled by model (the configured repo id; anything else is "other")
and outcome (`completed` or the error kind) only. Nothing here sees a user: the broker sends
none. `AgentTelemetry.disabled()` records nothing (tests of other parts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from edif.telemetry import (
    BYTES_BUCKETS,
    SECONDS_BUCKETS,
    JsonLinesSpanExporter,
    LogFormat,
    Telemetry,
    bind_job,
    configure_logging,
    context_from,
    unbind_job,
)
from edif.telemetry.http import MetricsServer, serve_metrics
from proto import site_agent_pb2 as pb

if TYPE_CHECKING:
    from site_agent.slots import ModelSlot

METRICS: dict[str, str] = {
    "edif_agent_jobs_total": "Jobs this agent ended, by model and outcome.",
    "edif_agent_queue_depth": "Jobs waiting for or running on each model's worker.",
    "edif_agent_model_up": "1 while the model's worker is loaded and healthy, else 0.",
    "edif_agent_queue_wait_seconds": "Time a job waited for the model's worker.",
    "edif_agent_deserialize_seconds": "Unpickling and checking a payload, in the worker.",
    "edif_agent_execution_seconds": "Running a job's block on the model, in the worker.",
    "edif_agent_result_bytes": "Size of the results sent to the broker.",
    "edif_agent_peak_memory_bytes": "Peak accelerator memory of a job (0 without CUDA).",
}

OTHER_MODEL = "other"
_NS = 1_000_000_000


class AgentTelemetry:
    def __init__(self, telemetry: Telemetry, site: str, models: Mapping[str, str]) -> None:
        """`models`: the site's model keys -> the repo ids used as the `model` label."""
        self.telemetry = telemetry
        self.site = site
        self.server: MetricsServer | None = None
        self._models = dict(models)
        self.tracer = telemetry.tracer("edif.agent")
        meter = telemetry.meter("edif.agent")

        def histogram(name: str, unit: str, buckets: Iterable[float]):
            return meter.create_histogram(
                name,
                unit=unit,
                description=METRICS[name],
                explicit_bucket_boundaries_advisory=list(buckets),
            )

        self.jobs = meter.create_counter(
            "edif_agent_jobs_total", description=METRICS["edif_agent_jobs_total"]
        )
        self.queue_wait = histogram("edif_agent_queue_wait_seconds", "s", SECONDS_BUCKETS)
        self.deserialize = histogram("edif_agent_deserialize_seconds", "s", SECONDS_BUCKETS)
        self.execution = histogram("edif_agent_execution_seconds", "s", SECONDS_BUCKETS)
        self.result_bytes = histogram("edif_agent_result_bytes", "By", BYTES_BUCKETS)
        self.peak_memory = histogram("edif_agent_peak_memory_bytes", "By", BYTES_BUCKETS)
        self._slots: Callable[[], Mapping[str, tuple[int, bool]]] = dict
        meter.create_observable_gauge(
            "edif_agent_queue_depth",
            [self._observe(lambda depth, up: depth)],
            description=METRICS["edif_agent_queue_depth"],
        )
        meter.create_observable_gauge(
            "edif_agent_model_up",
            [self._observe(lambda depth, up: int(up))],
            description=METRICS["edif_agent_model_up"],
        )

    @classmethod
    def disabled(cls) -> AgentTelemetry:
        return cls(Telemetry.disabled(), "", {})

    def close(self) -> None:
        """Stop serving /metrics and flush the spans still buffered."""
        if self.server is not None:
            self.server.close()
            self.server = None
        self.telemetry.shutdown()

    def watch(self, slots: Callable[[], Mapping[str, tuple[int, bool]]]) -> None:
        """`slots()` -> {model key: (queue depth, healthy)}, read at each scrape."""
        self._slots = slots

    def model_label(self, model_key: str) -> str:
        return self._models.get(model_key, OTHER_MODEL)

    def job(self, request: pb.ExecuteRequest, metadata: Iterable | None) -> AgentJob:
        return AgentJob(self, request, context_from(metadata))

    def _observe(self, pick: Callable[[int, bool], int]):
        def observe(options: CallbackOptions) -> list[Observation]:
            return [
                Observation(pick(depth, up), {"model": self.model_label(key)})
                for key, (depth, up) in self._slots().items()
            ]

        return observe


def start_telemetry(
    site: str,
    slots: Mapping[str, ModelSlot],
    *,
    metrics_host: str = "127.0.0.1",
    metrics_port: int | None = None,
    traces_file: Path | None = None,
    log_format: LogFormat = "text",
) -> AgentTelemetry:
    """The agent process's telemetry: JSON logs if asked, /metrics on `metrics_port` (None:
    not served), spans to `traces_file` (None: kept nowhere, though they still give log lines
    their trace id)."""
    configure_logging(log_format)
    models = {key: slot.cfg.repo_id for key, slot in slots.items()}
    exporter = JsonLinesSpanExporter(traces_file) if traces_file else None
    agent = AgentTelemetry(Telemetry.create("edif-agent", span_exporter=exporter), site, models)
    agent.watch(
        lambda: {key: (s.queue_depth, s.state.value == "RUNNING") for key, s in slots.items()}
    )
    if metrics_port is not None:
        agent.server = serve_metrics(agent.telemetry, metrics_host, metrics_port)
        print(
            f"edif-agent metrics on http://{metrics_host}:{agent.server.port}/metrics", flush=True
        )
    return agent


class AgentJob:
    """One Execute call's spans and measurements (see module doc)."""

    def __init__(self, owner: AgentTelemetry, request: pb.ExecuteRequest, parent) -> None:
        self._owner = owner
        self._tracer = owner.tracer
        self._labels = {"model": owner.model_label(request.model_key)}
        self._job_id = request.job_id
        self._started = time.monotonic()
        self.span = self._tracer.start_span(
            "edif.site.execute",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "edif.job.id": request.job_id,
                "edif.model": self._labels["model"],
                "edif.site": owner.site,
            },
        )
        self._context = trace.set_span_in_context(self.span)
        self._queue: Span | None = self._child("edif.site.queue_wait")
        self._running_ns: int | None = None
        self._first_chunk_ns: int | None = None
        self._bytes = 0
        self.outcome: str | None = None
        ids = self.span.get_span_context()
        trace_id = trace.format_trace_id(ids.trace_id) if ids.is_valid else ""
        self._log_binding = bind_job(request.job_id, trace_id)

    def update(self, update: pb.ExecuteUpdate) -> None:
        kind = update.WhichOneof("update")
        now = time.time_ns()
        if kind == "status" and update.status.phase == pb.RUNNING:
            self._end_queue()
            self._running_ns = self._running_ns or now
        elif kind == "chunk":
            self._first_chunk_ns = self._first_chunk_ns or now
            self._bytes += len(update.chunk.data)
        elif kind == "done":
            self._done(update.done, now)
        elif kind == "error":
            self.outcome = pb.ErrorKind.Name(update.error.kind).lower()

    def close(self) -> None:
        """The call is over; an outcome never seen means the broker hung up (or cancelled)."""
        self._end_queue(started=False)
        outcome = self.outcome or "abandoned"
        self.span.set_attribute("edif.outcome", outcome)
        if outcome != "completed":
            self.span.set_status(Status(StatusCode.ERROR, outcome))
        self.span.end()
        self._owner.jobs.add(1, {**self._labels, "outcome": outcome})
        unbind_job(self._log_binding)

    # -- helpers ------------------------------------------------------------------------------

    def _done(self, done: pb.ResultEnd, now: int) -> None:
        self.outcome = "completed"
        owner = self._owner
        owner.execution.record(done.execution_s, self._labels)
        owner.deserialize.record(done.deserialize_s, self._labels)
        owner.result_bytes.record(done.total_bytes, self._labels)
        owner.peak_memory.record(done.peak_memory_bytes, self._labels)
        self.span.set_attributes(
            {
                "edif.result.bytes": done.total_bytes,
                "edif.peak_memory_bytes": done.peak_memory_bytes,
            }
        )
        # The worker's phases, from when it said RUNNING; never past the end of the result.
        at = self._running_ns or now
        for name, seconds in (
            ("edif.site.deserialize", done.deserialize_s),
            ("edif.site.run", done.execution_s),
            ("edif.site.encode", done.encode_s),
        ):
            end = min(at + int(max(seconds, 0.0) * _NS), now)
            self._child(name, start=at).end(end_time=end)
            at = end
        transfer = self._child("edif.site.result_transfer", start=self._first_chunk_ns or now)
        transfer.set_attribute("edif.result.bytes", self._bytes)
        transfer.end(end_time=now)

    def _end_queue(self, started: bool = True) -> None:
        if self._queue is not None:
            self._queue.end()
            self._queue = None
            if started:  # a job refused or cancelled while waiting did not wait for a worker
                self._owner.queue_wait.record(time.monotonic() - self._started, self._labels)

    def _child(self, name: str, start: int | None = None) -> Span:
        return self._tracer.start_span(
            name, context=self._context, start_time=start, attributes={"edif.job.id": self._job_id}
        )
