"""Telemetry shared by the broker and the site agent: OpenTelemetry providers, W3C trace
context over gRPC metadata, JSON logs that name the job and its trace, and a small /metrics
server for processes without an HTTP front.

Flow: a process builds one `Telemetry` (its own tracer and meter providers, never the global
ones, so tests can hold several side by side with in-memory exporters) and hands it to the
parts that record spans and `edif_*` metrics (`broker.telemetry`, `site_agent.telemetry`).
The broker injects its dispatch span's context into Execute's metadata (`headers_for`); the
agent continues the trace from it (`context_from`). Nothing here ever sees a user id or token.
"""

from edif.telemetry.logs import JsonFormatter, LogFormat, bind_job, configure_logging, unbind_job
from edif.telemetry.propagation import context_from, headers_for
from edif.telemetry.providers import (
    BYTES_BUCKETS,
    SECONDS_BUCKETS,
    JsonLinesSpanExporter,
    Telemetry,
)

__all__ = [
    "BYTES_BUCKETS",
    "SECONDS_BUCKETS",
    "JsonFormatter",
    "JsonLinesSpanExporter",
    "LogFormat",
    "Telemetry",
    "bind_job",
    "configure_logging",
    "context_from",
    "headers_for",
    "unbind_job",
]
