"""W3C trace context (`traceparent`, `tracestate`) in gRPC metadata, both directions.

The broker adds `headers_for(dispatch_context)` to Execute's metadata beside the bearer
credential; the agent's servicer rebuilds the parent with `context_from(metadata)`. Junk or
missing headers give an empty context: the agent then starts a trace of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def headers_for(context: Context | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata pairs carrying `context`'s current span (none without a valid one)."""
    if context is None:
        return ()
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return tuple(carrier.items())


def context_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The remote parent named in gRPC metadata (binary `-bin` entries are ignored)."""
    carrier = {key.lower(): value for key, value in (metadata or ()) if isinstance(value, str)}
    return _PROPAGATOR.extract(carrier)
