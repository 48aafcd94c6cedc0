"""One trace per job at the broker: the job span and its children.

    edif.job                    RECEIVED -> the job's task is done (attrs: job id, model, site,
    ├─ edif.queue_wait          outcome, attempts, error kind); one per wait for a site
    ├─ edif.dispatch            one per attempt (attrs: site, attempt, outcome); the site's
    │  │                        spans hang below it through the traceparent sent on Execute
    │  └─ edif.result.from_site first result chunk -> ResultEnd (attrs: bytes)
    ├─ edif.result.to_client    the final frame (inline result or result URL) going out
    └─ edif.result.download     GET /results for this job (may come after the job span ended)

Spans start and end when the service reports the change (wall clock), so a fake clock in the
service does not matter. Jobs recovered from an earlier broker instance get their job span at
their first reported change. A finished job's context is kept (bounded) for later downloads.
Attributes never carry the owner's id, token or error text (it may quote the user's code).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from broker.jobs import Job, JobState
from edif.telemetry import bind_job

KEEP_FINISHED = 10_000


@dataclass
class _JobSpans:
    job: Span
    context: Context
    queue: Span | None = None
    attempt: Span | None = None
    attempt_context: Context | None = None
    from_site: Span | None = None
    to_client: Span | None = None


class JobTraces:
    def __init__(self, tracer: trace.Tracer, keep_finished: int = KEEP_FINISHED) -> None:
        self._tracer = tracer
        self._live: dict[str, _JobSpans] = {}
        self._finished: OrderedDict[str, Context] = OrderedDict()
        self._keep = keep_finished

    def received(self, job: Job) -> None:
        self._spans(job)

    def advanced(self, job: Job, state: JobState) -> None:
        spans = self._spans(job)
        if state is JobState.QUEUED:
            self._end_attempt(spans, "site_failed")
            spans.queue = spans.queue or self._child(spans.context, "edif.queue_wait", job)
        elif state is JobState.DISPATCHED:
            _end(spans.queue)
            spans.queue = None
            self._end_attempt(spans, "superseded")
            attrs = {"edif.site": job.site or "", "edif.attempt": len(job.attempts)}
            spans.attempt = self._child(spans.context, "edif.dispatch", job, SpanKind.CLIENT)
            spans.attempt.set_attributes(attrs)
            spans.attempt_context = trace.set_span_in_context(spans.attempt, spans.context)
        elif state is JobState.RUNNING and spans.attempt is not None:
            spans.attempt.add_event("running")

    def dispatch_context(self, job_id: str) -> Context | None:
        """The context the site call continues (the attempt's span, else the job's)."""
        spans = self._live.get(job_id)
        if spans is None:
            return None
        return spans.attempt_context or spans.context

    def result_from_site(self, job_id: str, site: str) -> None:
        spans = self._live.get(job_id)
        if spans is not None and spans.from_site is None:
            parent = spans.attempt_context or spans.context
            spans.from_site = self._tracer.start_span(
                "edif.result.from_site",
                context=parent,
                attributes={"edif.job.id": job_id, "edif.site": site},
            )

    def result_received(self, job_id: str, size: int, complete: bool) -> None:
        spans = self._live.get(job_id)
        if spans is None or spans.from_site is None:
            return
        spans.from_site.set_attribute("edif.result.bytes", size)
        if not complete:
            spans.from_site.set_status(Status(StatusCode.ERROR, "stream ended early"))
        _end(spans.from_site)
        spans.from_site = None

    def delivering(self, job: Job, inline: bool) -> None:
        spans = self._live.get(job.id)
        if spans is not None:
            spans.to_client = self._child(spans.context, "edif.result.to_client", job)
            spans.to_client.set_attribute("edif.result.inline", inline)

    def ended(self, job: Job, kind: str | None) -> None:
        spans = self._live.pop(job.id, None)
        if spans is None:
            return
        outcome = job.state.value.lower() if job.state.terminal else "handed_over"
        for span in (spans.queue, spans.from_site, spans.to_client):
            _end(span)
        self._end_attempt(spans, outcome)
        spans.job.set_attributes(
            {
                "edif.site": job.site or "",
                "edif.outcome": outcome,
                "edif.attempts": len(job.attempts),
            }
        )
        if job.result is not None and job.state is JobState.COMPLETED:
            spans.job.set_attribute("edif.result.bytes", job.result.size)
        if job.state is JobState.ERROR:
            spans.job.set_attribute("edif.error.kind", kind or "broker")
            spans.job.set_status(Status(StatusCode.ERROR, kind or "broker"))
        spans.job.end()
        self._finished[job.id] = spans.context
        while len(self._finished) > self._keep:
            self._finished.popitem(last=False)

    def context_of(self, job_id: str) -> Context | None:
        """The job span's context, while live or kept after it ended (result downloads)."""
        spans = self._live.get(job_id)
        return spans.context if spans is not None else self._finished.get(job_id)

    def download(self, job_id: str) -> Span | None:
        """A span for a result download of a known job (None for ids not ours)."""
        context = self.context_of(job_id)
        if context is None:
            return None
        return self._tracer.start_span(
            "edif.result.download",
            context=context,
            kind=SpanKind.SERVER,
            attributes={"edif.job.id": job_id},
        )

    # -- helpers ------------------------------------------------------------------------------

    def _spans(self, job: Job) -> _JobSpans:
        spans = self._live.get(job.id)
        if spans is None:
            span = self._tracer.start_span(
                "edif.job",
                context=Context(),  # a new trace: nnsight clients send no trace context
                attributes={"edif.job.id": job.id, "edif.model": job.submission.model_key.repo_id},
            )
            context = trace.set_span_in_context(span, Context())
            spans = self._live[job.id] = _JobSpans(span, context)
            if job.state in (JobState.RECEIVED, JobState.QUEUED):
                spans.queue = self._child(context, "edif.queue_wait", job)
            # The job's own task (spawned after this) and its log lines inherit this.
            ids = span.get_span_context()
            bind_job(job.id, trace.format_trace_id(ids.trace_id) if ids.is_valid else "")
        return spans

    def _child(
        self, parent: Context, name: str, job: Job, kind: SpanKind = SpanKind.INTERNAL
    ) -> Span:
        return self._tracer.start_span(
            name, context=parent, kind=kind, attributes={"edif.job.id": job.id}
        )

    @staticmethod
    def _end_attempt(spans: _JobSpans, outcome: str) -> None:
        if spans.attempt is not None:
            spans.attempt.set_attribute("edif.outcome", outcome)
            if outcome in ("error", "site_failed"):
                spans.attempt.set_status(Status(StatusCode.ERROR, outcome))
            spans.attempt.end()
            spans.attempt = None
            spans.attempt_context = None


def _end(span: Span | None) -> None:
    if span is not None and span.is_recording():
        span.end()
