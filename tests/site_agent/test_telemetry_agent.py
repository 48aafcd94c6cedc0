"""The agent's telemetry on its own: /metrics server, outcomes of calls that do not complete."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import nnsight
import pytest
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from edif.demo import TINY_GPT2, load
from edif.telemetry import Telemetry, headers_for
from proto import site_agent_pb2 as pb
from site_agent.execution import run_request
from site_agent.telemetry import AgentTelemetry, start_telemetry

KEY = "nnsight.modeling.language.LanguageModel:tiny"


@dataclass
class FakeSlot:
    cfg: SimpleNamespace
    queue_depth: int
    state: SimpleNamespace


def slot(repo_id: str, depth: int, state: str) -> FakeSlot:
    return FakeSlot(SimpleNamespace(repo_id=repo_id), depth, SimpleNamespace(value=state))


def test_metrics_are_served_on_the_configured_port_and_only_while_running() -> None:
    slots = {KEY: slot("edif-demo/tiny-gpt2", 3, "RUNNING"), "other": slot("x/y", 0, "UNHEALTHY")}
    agent = start_telemetry("site-a", slots, metrics_port=0)
    assert agent.server is not None
    url = f"http://127.0.0.1:{agent.server.port}/metrics"
    try:
        text = httpx.get(url, timeout=5).text
    finally:
        agent.close()
    assert 'edif_agent_model_up{model="edif-demo/tiny-gpt2"} 1.0' in text
    assert 'edif_agent_model_up{model="x/y"} 0.0' in text
    assert 'edif_agent_queue_depth{model="edif-demo/tiny-gpt2"} 3.0' in text
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, timeout=2)


def test_no_metrics_port_serves_nothing() -> None:
    agent = start_telemetry("site-a", {}, metrics_port=None)
    assert agent.server is None
    agent.close()


@pytest.fixture
def recorded():
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = Telemetry.create("edif-agent", span_exporter=spans, metric_readers=[metrics])
    return AgentTelemetry(telemetry, "site-a", {KEY: "edif-demo/tiny-gpt2"}), spans, metrics


def counts(reader: InMemoryMetricReader, name: str) -> dict:
    found = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in (m for m in scope.metrics if m.name == name):
                for point in metric.data.data_points:
                    found[tuple(sorted(point.attributes.items()))] = getattr(
                        point, "value", getattr(point, "count", None)
                    )
    return found


def test_a_refused_job_and_an_abandoned_call(recorded) -> None:
    agent, spans, metrics = recorded
    parent_provider = Telemetry.create("edif-broker", span_exporter=InMemorySpanExporter())
    parent = parent_provider.tracer("test").start_span("edif.dispatch")
    metadata = headers_for(trace.set_span_in_context(parent))

    refused = agent.job(pb.ExecuteRequest(job_id="j1", model_key=KEY), metadata)
    refused.update(pb.ExecuteUpdate(error=pb.JobError(kind=pb.REFUSED, description="no")))
    refused.close()
    abandoned = agent.job(pb.ExecuteRequest(job_id="j2", model_key="unknown:key"), ())
    abandoned.update(pb.ExecuteUpdate(status=pb.StatusUpdate(phase=pb.RUNNING)))
    abandoned.close()  # the broker hung up before any result

    by_job = {
        s.attributes["edif.job.id"]: s
        for s in spans.get_finished_spans()
        if s.name == "edif.site.execute"
    }
    assert by_job["j1"].attributes["edif.outcome"] == "refused"
    assert by_job["j1"].parent.span_id == parent.get_span_context().span_id
    assert by_job["j2"].attributes["edif.outcome"] == "abandoned"
    assert by_job["j2"].status.status_code is StatusCode.ERROR
    assert by_job["j2"].attributes["edif.model"] == "other"  # unknown keys never become labels
    assert counts(metrics, "edif_agent_jobs_total") == {
        (("model", "edif-demo/tiny-gpt2"), ("outcome", "refused")): 1,
        (("model", "other"), ("outcome", "abandoned")): 1,
    }
    # Only the job that reached its worker waited for one.
    assert counts(metrics, "edif_agent_queue_wait_seconds") == {(("model", "other"),): 1}


class Capture(Backend):
    """Serializes the trace as nnsight's RemoteBackend would, and keeps the bytes."""

    def __init__(self, model) -> None:
        self.env = model._remoteable_get_env()
        self.blob = b""

    def __call__(self, tracer) -> None:
        nnsight.ndif.pull_env()
        self.blob = RequestModel.serialize(tracer, True)


def test_the_worker_measures_deserialize_and_encode_for_the_agents_spans(tmp_path) -> None:
    meta = load(TINY_GPT2, home=tmp_path)
    real = load(TINY_GPT2, dispatch=True, home=tmp_path)
    capture = Capture(meta)
    with meta.trace("the capital of france is", backend=capture):
        logits = meta.lm_head.output.save()  # noqa: F841 - pushed to the client's frame
    out = run_request(real, capture.blob, True, capture.env, lambda line: None)
    assert out.deserialize_s > 0 and out.encode_s > 0 and out.execution_s > 0
    done = pb.ResultEnd(
        total_bytes=len(out.result_bytes),
        execution_s=out.execution_s,
        deserialize_s=out.deserialize_s,
        encode_s=out.encode_s,
    )
    assert pb.ResultEnd.FromString(done.SerializeToString()).deserialize_s == out.deserialize_s
