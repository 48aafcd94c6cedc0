"""Structured logs: one JSON object per line, naming the job and its trace when in one.

`configure_logging("json")` gives the root logger a stream handler with `JsonFormatter`
(`ts`, `level`, `logger`, `msg`, and `job_id` / `trace_id` while a job is bound, `exc` with a
traceback); `"text"` leaves the process's logging as it was, so tests and the demo keep
today's format. `bind_job` sets the job for the current context: asyncio tasks created after
it inherit it (the broker binds at RECEIVED, before the job's task starts; the agent binds for
one Execute call). Messages are logged as the code wrote them: the code never logs user ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Literal

from opentelemetry import trace

LogFormat = Literal["text", "json"]

_JOB: ContextVar[tuple[str, str] | None] = ContextVar("edif_job", default=None)


def bind_job(job_id: str, trace_id: str = "") -> Token:
    """Name `job_id` (and its trace, 32 hex digits) in this context's log lines."""
    return _JOB.set((job_id, trace_id))


def unbind_job(token: Token) -> None:
    # A reset from another context (a generator closed elsewhere) is harmless: skip it.
    with contextlib.suppress(ValueError):
        _JOB.reset(token)


def current_job() -> tuple[str, str] | None:
    return _JOB.get()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        bound = _JOB.get()
        trace_id = bound[1] if bound else ""
        if not trace_id:
            span = trace.get_current_span().get_span_context()
            trace_id = trace.format_trace_id(span.trace_id) if span.is_valid else ""
        if bound:
            entry["job_id"] = bound[0]
        if trace_id:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(fmt: LogFormat, level: int = logging.INFO) -> None:
    """Switch the process to JSON lines on stderr (`json`); `text` changes nothing."""
    if fmt != "json":
        return
    root = logging.getLogger()
    handlers = root.handlers or [logging.StreamHandler(sys.stderr)]
    for handler in handlers:
        handler.setFormatter(JsonFormatter())
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
