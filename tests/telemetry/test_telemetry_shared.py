"""edif.telemetry: JSON log lines, job binding across tasks, trace context in metadata."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from edif.telemetry import (
    JsonFormatter,
    JsonLinesSpanExporter,
    Telemetry,
    bind_job,
    configure_logging,
    context_from,
    headers_for,
    unbind_job,
)


@pytest.fixture
def captured():
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("edif.test.telemetry")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, lambda: [json.loads(line) for line in lines.getvalue().splitlines()]
    logger.removeHandler(handler)


async def test_a_bound_job_follows_tasks_started_after_it(captured) -> None:
    logger, entries = captured
    logger.info("before any job")
    token = bind_job("job-1", "ab" * 16)

    async def in_task() -> None:
        logger.info("inside %s", "the job's task")

    await asyncio.create_task(in_task())
    unbind_job(token)
    logger.info("after it")
    first, inside, after = entries()
    assert set(first) == {"ts", "level", "logger", "msg"}
    assert first["logger"] == "edif.test.telemetry" and first["level"] == "INFO"
    assert first["ts"].endswith("+00:00")
    assert inside == {**inside, "msg": "inside the job's task", "job_id": "job-1"}
    assert inside["trace_id"] == "ab" * 16
    assert "job_id" not in after


def test_the_current_span_gives_the_trace_id_and_exceptions_their_traceback(captured) -> None:
    logger, entries = captured
    telemetry = Telemetry.create("t", span_exporter=InMemorySpanExporter(), prometheus=False)
    with telemetry.tracer("t").start_as_current_span("work") as span:
        try:
            raise ValueError("bad value")
        except ValueError:
            logger.exception("failed")
    (entry,) = entries()
    assert entry["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert entry["level"] == "ERROR" and "ValueError: bad value" in entry["exc"]


def test_configure_logging_json_switches_the_root_handlers_and_text_changes_nothing() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, [h.formatter for h in root.handlers])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.handlers = [handler]
    try:
        configure_logging("text")
        assert handler.formatter is None
        configure_logging("json")
        logging.getLogger("edif.test.root").info("hello %d", 1)
        assert json.loads(stream.getvalue())["msg"] == "hello 1"
    finally:
        root.handlers, root.level = saved[0], saved[1]
        for h, formatter in zip(saved[0], saved[2], strict=True):
            h.setFormatter(formatter)


def test_trace_context_round_trips_through_grpc_metadata() -> None:
    telemetry = Telemetry.create("t", span_exporter=InMemorySpanExporter(), prometheus=False)
    span = telemetry.tracer("t").start_span("dispatch")
    metadata = headers_for(trace.set_span_in_context(span))
    assert [key for key, _ in metadata] == ["traceparent"]
    remote = trace.get_current_span(context_from([("authorization", "Bearer x"), *metadata]))
    assert remote.get_span_context().trace_id == span.get_span_context().trace_id
    assert remote.get_span_context().is_remote
    junk = trace.get_current_span(context_from([("traceparent", "nonsense"), ("x-bin", b"\0")]))
    assert not junk.get_span_context().is_valid
    assert headers_for(None) == ()


def test_spans_can_go_to_a_json_lines_file(tmp_path) -> None:
    path = tmp_path / "traces" / "spans.jsonl"
    telemetry = Telemetry.create("t", span_exporter=JsonLinesSpanExporter(path), prometheus=False)
    with telemetry.tracer("t").start_as_current_span("one"):
        pass
    telemetry.shutdown()  # flushes the batch
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["name"] == "one"


def test_disabled_telemetry_records_nothing() -> None:
    telemetry = Telemetry.disabled()
    span = telemetry.tracer("t").start_span("x")
    assert not span.get_span_context().is_valid
    assert telemetry.prometheus_text() == b""
