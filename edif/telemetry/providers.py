"""One process's OpenTelemetry providers: traces, metrics, and their Prometheus text.

`Telemetry.create(service)` gives a tracer provider (spans to `span_exporter` when one is
given: in-memory in tests, `JsonLinesSpanExporter` for a traces file in production) and a
meter provider read by a Prometheus reader on the process's own `CollectorRegistry` (plus any
extra reader: `InMemoryMetricReader` in tests). `Telemetry.disabled()` records nothing, for
the parts and tests that do not care. Providers are never installed globally.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Histogram bounds: jobs last milliseconds to an hour; results are bytes to gigabytes.
SECONDS_BUCKETS: Sequence[float] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
BYTES_BUCKETS: Sequence[float] = tuple(float(1024 * 4**i) for i in range(12))  # 1 KiB .. 4 GiB


class Telemetry:
    """A process's tracer and meter providers (see module doc)."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider,
        meter_provider: metrics.MeterProvider,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.registry = registry

    @classmethod
    def create(
        cls,
        service: str,
        *,
        span_exporter: SpanExporter | None = None,
        metric_readers: Sequence[MetricReader] = (),
        prometheus: bool = True,
    ) -> Telemetry:
        resource = Resource.create({"service.name": service})
        tracer_provider = TracerProvider(resource=resource)
        if span_exporter is not None:
            # In-memory (tests) must see a span once it ended; files and networks get batches.
            synchronous = isinstance(span_exporter, InMemorySpanExporter)
            processor = SimpleSpanProcessor if synchronous else BatchSpanProcessor
            tracer_provider.add_span_processor(processor(span_exporter))
        readers = list(metric_readers)
        registry = CollectorRegistry(auto_describe=False) if prometheus else None
        if registry is not None:
            readers.append(
                PrometheusMetricReader(
                    disable_target_info=True, scope_info_enabled=False, registry=registry
                )
            )
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        return cls(tracer_provider, meter_provider, registry)

    @classmethod
    def disabled(cls) -> Telemetry:
        return cls(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider())

    def tracer(self, name: str) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    def prometheus_text(self) -> bytes:
        """The current metrics in Prometheus' text format (empty when not exported)."""
        return generate_latest(self.registry) if self.registry is not None else b""

    def shutdown(self) -> None:
        """Flush pending spans; stop the readers. Idempotent enough for a process exit."""
        for provider in (self.tracer_provider, self.meter_provider):
            shutdown = getattr(provider, "shutdown", None)
            if shutdown is not None:
                shutdown()


class JsonLinesSpanExporter(SpanExporter):
    """Finished spans appended to a file, one JSON object per line (a collector tails it)."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n"
                        for span in spans)  # fmt: skip
        try:
            with self._lock, self._path.open("a", encoding="utf-8") as out:
                out.write(lines)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass
