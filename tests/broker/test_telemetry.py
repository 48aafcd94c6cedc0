"""Telemetry end to end in one process: the broker's job service and gRPC site client talk to
a real site-agent gRPC server (a fake executor behind it), each side with its own in-memory
span exporter and metric reader, as two processes would have."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from broker_fakes import (
    GPT2_KEY,
    RESULT,
    FakeAuthenticator,
    FakeIdentity,
    FakeSiteClient,
    RecordingSink,
    describe,
    settings_for,
)
from fastapi.testclient import TestClient
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from broker.app import create_app
from broker.catalog import SiteCatalog
from broker.config import BrokerSettings, SiteEntry
from broker.main import build_app
from broker.results import DiskResultStore
from broker.service import BrokerService
from broker.sites import GrpcSiteClient
from broker.telemetry import METRICS as BROKER_METRICS
from broker.telemetry import BrokerTelemetry
from broker.telemetry.http import add_telemetry_routes
from edif.clock import FakeClock
from edif.telemetry import JsonFormatter, Telemetry
from proto import site_agent_pb2 as pb
from proto import site_agent_pb2_grpc as pb_grpc
from site_agent.config import SiteConfig
from site_agent.executor import JobSpec
from site_agent.main import broker_verifier
from site_agent.servicer import build_server
from site_agent.telemetry import METRICS as AGENT_METRICS
from site_agent.telemetry import AgentTelemetry

ALICE = FakeIdentity("alice@example.org")
CHUNK = 256


class ScriptedExecutor:
    """Answers like a site's PoolExecutor: QUEUED, RUNNING, the result, or a JobError when the
    payload says `fail`."""

    def __init__(self) -> None:
        self.jobs: list[JobSpec] = []

    def describe(self) -> pb.SiteDescription:
        return describe("site-a", GPT2_KEY)

    async def execute(self, job: JobSpec) -> AsyncIterator[pb.ExecuteUpdate]:
        self.jobs.append(job)
        logging.getLogger("edif.agent.test").info("executing %s", job.job_id)
        yield pb.ExecuteUpdate(status=pb.StatusUpdate(phase=pb.QUEUED, position=0))
        yield pb.ExecuteUpdate(status=pb.StatusUpdate(phase=pb.RUNNING))
        if job.payload == b"fail":
            yield pb.ExecuteUpdate(error=pb.JobError(kind=pb.USER, description="boom"))
            return
        for start in range(0, len(RESULT), CHUNK):
            yield pb.ExecuteUpdate(chunk=pb.ResultChunk(data=RESULT[start : start + CHUNK]))
        yield pb.ExecuteUpdate(
            done=pb.ResultEnd(
                total_bytes=len(RESULT),
                sha256=hashlib.sha256(RESULT).hexdigest(),
                execution_s=0.002,
                deserialize_s=0.001,
                encode_s=0.0005,
                peak_memory_bytes=4096,
            )
        )

    async def cancel(self, job_id: str) -> bool:
        return False


@dataclass
class Mesh:
    service: BrokerService
    broker: BrokerTelemetry
    broker_spans: InMemorySpanExporter
    broker_metrics: InMemoryMetricReader
    agent: AgentTelemetry
    agent_spans: InMemorySpanExporter
    agent_metrics: InMemoryMetricReader
    address: str
    settings: BrokerSettings


@pytest.fixture
async def mesh(tmp_path):
    keys = KeyStore(tmp_path / "keys")
    keys.signing_key()
    broker_spans, agent_spans = InMemorySpanExporter(), InMemorySpanExporter()
    broker_metrics, agent_metrics = InMemoryMetricReader(), InMemoryMetricReader()
    agent_telemetry = AgentTelemetry(
        Telemetry.create("edif-agent", span_exporter=agent_spans, metric_readers=[agent_metrics]),
        "site-a",
        {GPT2_KEY: "openai-community/gpt2"},
    )
    agent_telemetry.watch(lambda: {GPT2_KEY: (0, True)})
    cfg = SiteConfig(site="site-a", models=[{"repo_id": "openai-community/gpt2"}])
    server, _ = build_server(
        ScriptedExecutor(), broker_verifier(cfg, keys.jwks()), [], agent_telemetry
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    class Credentials:
        def token_for(self, site: str) -> str:
            return TokenIssuer(keys).issue("broker", Role.BROKER, 60, audience=f"edif-site:{site}")

    broker_telemetry = BrokerTelemetry(
        Telemetry.create("edif-broker", span_exporter=broker_spans, metric_readers=[broker_metrics])
    )
    client = GrpcSiteClient(
        {"site-a": f"127.0.0.1:{port}"}, Credentials(), observer=broker_telemetry
    )
    settings = settings_for(tmp_path)
    clock = FakeClock()
    sites = [SiteEntry(name="site-a", address=f"127.0.0.1:{port}")]
    catalog = SiteCatalog(sites, client, settings.describe_refresh_s, settings.startup_wait_s)
    results = DiskResultStore(
        settings.data_dir / "results", clock, settings.result_ttl_s, settings.max_result_bytes
    )
    service = BrokerService(
        settings, catalog, client, results, lambda sub: "u-pseudo", clock, observer=broker_telemetry
    )
    broker_telemetry.watch(
        sites=lambda: {v.name: v.reachable for v in catalog.views()},
        result_store=settings.data_dir / "results",
    )
    await service.start()
    yield Mesh(
        service,
        broker_telemetry,
        broker_spans,
        broker_metrics,
        agent_telemetry,
        agent_spans,
        agent_metrics,
        f"127.0.0.1:{port}",
        settings,
    )
    await service.close()
    await server.stop(None)


async def run_job(service: BrokerService, payload: bytes = b"blob", listen: bool = True) -> str:
    session_id = await service.open_session(RecordingSink(), ALICE) if listen else ""
    envelope = json.dumps({"model_key": GPT2_KEY, "session_id": session_id, "compress": False})
    reply = await service.submit(
        ALICE, envelope, payload, {"nnsight-version": "0.8.1"}, "http://broker.test"
    )
    await service.drain()
    return reply.id


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of one metric (sums and gauges: value; histograms: count)."""
    found: dict[tuple, float] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count
                    found[tuple(sorted(point.attributes.items()))] = value
    return found


async def test_one_job_is_one_trace_across_broker_and_agent(mesh) -> None:
    job_id = await run_job(mesh.service)
    assert mesh.service.job(job_id).state.value == "COMPLETED"
    broker = {span.name: span for span in mesh.broker_spans.get_finished_spans()}
    agent = {span.name: span for span in mesh.agent_spans.get_finished_spans()}
    assert {
        "edif.job",
        "edif.queue_wait",
        "edif.dispatch",
        "edif.result.from_site",
        "edif.result.to_client",
    } <= set(broker)
    assert {
        "edif.site.execute",
        "edif.site.queue_wait",
        "edif.site.deserialize",
        "edif.site.run",
        "edif.site.encode",
        "edif.site.result_transfer",
    } <= set(agent)
    trace_ids = {s.context.trace_id for s in [*broker.values(), *agent.values()]}
    assert trace_ids == {broker["edif.job"].context.trace_id}
    # The agent's call hangs below the broker's dispatch span (traceparent in gRPC metadata).
    assert agent["edif.site.execute"].parent.span_id == broker["edif.dispatch"].context.span_id
    assert agent["edif.site.execute"].parent.is_remote
    job = broker["edif.job"]
    assert job.attributes["edif.job.id"] == job_id
    assert job.attributes["edif.model"] == "openai-community/gpt2"
    assert job.attributes["edif.site"] == "site-a"
    assert job.attributes["edif.outcome"] == "completed"
    assert broker["edif.dispatch"].attributes["edif.site"] == "site-a"
    assert broker["edif.result.from_site"].attributes["edif.result.bytes"] == len(RESULT)
    assert broker["edif.result.to_client"].attributes["edif.result.inline"] is True
    assert agent["edif.site.execute"].attributes["edif.outcome"] == "completed"
    run = agent["edif.site.run"]
    assert run.start_time >= agent["edif.site.deserialize"].end_time
    assert run.end_time <= agent["edif.site.result_transfer"].end_time
    for span in [*broker.values(), *agent.values()]:  # pseudonymous at most: never the user
        assert "alice" not in json.dumps(dict(span.attributes or {}))


async def test_json_logs_name_the_job_and_its_trace_at_broker_and_agent(mesh) -> None:
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger("broker.service"), logging.getLogger("edif.agent.test")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        job_id = await run_job(mesh.service)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    entries = [json.loads(line) for line in lines.getvalue().splitlines()]
    job_span = next(s for s in mesh.broker_spans.get_finished_spans() if s.name == "edif.job")
    trace_id = f"{job_span.context.trace_id:032x}"
    about_job = [e for e in entries if job_id in e["msg"]]
    assert {e["logger"] for e in about_job} == {"broker.service", "edif.agent.test"}
    assert any("received" in e["msg"] for e in about_job)
    assert any("completed" in e["msg"] for e in about_job)
    for entry in about_job:
        assert set(entry) >= {"ts", "level", "logger", "msg", "job_id", "trace_id"}
        assert entry["job_id"] == job_id and entry["trace_id"] == trace_id
        assert "alice" not in json.dumps(entry)


async def test_metrics_change_as_jobs_complete_and_fail(mesh) -> None:
    await run_job(mesh.service)
    assert points(mesh.broker_metrics, "edif_jobs_total") == {(("status", "completed"),): 1}
    await run_job(mesh.service)
    await run_job(mesh.service, payload=b"fail")
    assert points(mesh.broker_metrics, "edif_jobs_total") == {
        (("status", "completed"),): 2,
        (("status", "error"),): 1,
    }
    assert points(mesh.broker_metrics, "edif_errors_total") == {(("kind", "site_user"),): 1}
    assert points(mesh.broker_metrics, "edif_queue_wait_seconds") == {(): 3}
    assert points(mesh.broker_metrics, "edif_queue_depth") == {(): 0}
    assert points(mesh.broker_metrics, "edif_jobs_in_flight") == {(): 0}
    assert points(mesh.broker_metrics, "edif_execution_seconds") == {(("site", "site-a"),): 2}
    assert points(mesh.broker_metrics, "edif_result_bytes") == {(("site", "site-a"),): 2}
    assert points(mesh.broker_metrics, "edif_site_up") == {(("site", "site-a"),): 1}
    assert points(mesh.broker_metrics, "edif_dispatch_attempts_total") == {
        (("outcome", "completed"), ("site", "site-a")): 2,
        (("outcome", "error"), ("site", "site-a")): 1,
    }
    gpt2 = ("model", "openai-community/gpt2")
    assert points(mesh.agent_metrics, "edif_agent_jobs_total") == {
        (gpt2, ("outcome", "completed")): 2,
        (gpt2, ("outcome", "user")): 1,
    }
    assert points(mesh.agent_metrics, "edif_agent_execution_seconds") == {(gpt2,): 2}
    assert points(mesh.agent_metrics, "edif_agent_peak_memory_bytes") == {(gpt2,): 2}
    error_span = next(
        s
        for s in mesh.broker_spans.get_finished_spans()
        if s.name == "edif.job" and s.attributes["edif.outcome"] == "error"
    )
    assert error_span.attributes["edif.error.kind"] == "site_user"
    assert "boom" not in str(error_span.status.description)  # the site's text may quote code


async def test_refusals_are_counted_by_kind(mesh) -> None:
    envelope = json.dumps({"model_key": "not a key", "session_id": "", "compress": False})
    with pytest.raises(Exception):  # noqa: B017 - the kind is what this test is about
        await mesh.service.submit(ALICE, envelope, b"x", {}, "http://broker.test")
    assert points(mesh.broker_metrics, "edif_refusals_total") == {(("kind", "bad_request"),): 1}
    assert points(mesh.broker_metrics, "edif_jobs_total") == {(("status", "refused"),): 1}


async def test_metrics_endpoint_and_result_download_span(mesh) -> None:
    job_id = await run_job(mesh.service, listen=False)
    url = mesh.service.job(job_id).latest.data
    app = create_app(mesh.service, FakeAuthenticator(), mesh.settings, lambda: {"keys": []})
    add_telemetry_routes(app, mesh.broker)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
        downloaded = await http.get(url.removeprefix("http://broker.test"))
        assert downloaded.status_code == 200 and downloaded.content == RESULT
        metrics = await http.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    assert 'edif_jobs_total{status="completed"} 1.0' in text
    assert f"edif_result_download_bytes_total {float(len(RESULT))}" in text
    assert 'edif_site_up{site="site-a"} 1.0' in text
    assert "edif_result_store_capacity_bytes" in text
    assert "alice" not in text
    spans = mesh.broker_spans.get_finished_spans()
    download = next(s for s in spans if s.name == "edif.result.download")
    job = next(s for s in spans if s.name == "edif.job")
    assert download.context.trace_id == job.context.trace_id
    assert download.attributes["edif.bytes_sent"] == len(RESULT)
    assert not any(url.rsplit("/", 1)[1] in json.dumps(dict(s.attributes)) for s in spans)


async def test_an_agent_call_without_trace_context_starts_its_own_trace(mesh, tmp_path) -> None:
    # A caller that sends no traceparent (an older broker): the agent still traces the job.
    keys = KeyStore(tmp_path / "keys")
    token = TokenIssuer(keys).issue("broker", Role.BROKER, 60, audience="edif-site:site-a")
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = pb_grpc.SiteAgentStub(channel)
        request = pb.ExecuteRequest(job_id="j-untraced", model_key=GPT2_KEY, payload=b"p")
        updates = [
            u async for u in stub.Execute(request, metadata=(("authorization", f"Bearer {token}"),))
        ]
    assert updates[-1].HasField("done")
    execute = next(
        s for s in mesh.agent_spans.get_finished_spans() if s.name == "edif.site.execute"
    )
    assert execute.parent is None and execute.attributes["edif.job.id"] == "j-untraced"


# -- deploy/observability: dashboards and alerts use only what the code exports -----------------

OBSERVABILITY = Path(__file__).resolve().parents[2] / "deploy" / "observability"
PROMETHEUS_BUILTINS = {"up"}  # series Prometheus itself adds to every scrape target


def exported_series(text: str) -> tuple[set[str], set[str]]:
    """(metric family names, sample names) in Prometheus text."""
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    samples = {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    return families, samples


def referenced_series() -> dict[str, set[str]]:
    """{file: metric names its PromQL expressions use}."""
    exprs: dict[str, list[str]] = {}
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    exprs["grafana-dashboard.json"] = [
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    ]
    alerts = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())
    exprs["alerts.yml"] = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    names = {}
    for name, found in exprs.items():
        stripped = [re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr) for expr in found]
        words = set(re.findall(r"[a-z_][a-z0-9_]*", " ".join(stripped)))
        names[name] = {w for w in words if w.startswith("edif_") or w in PROMETHEUS_BUILTINS}
    return names


async def test_dashboard_and_alerts_use_only_exported_metrics(mesh) -> None:
    await run_job(mesh.service)
    job_id = await run_job(mesh.service, listen=False)
    await run_job(mesh.service, payload=b"fail")
    envelope = json.dumps({"model_key": "not a key", "session_id": "", "compress": False})
    with pytest.raises(Exception):  # noqa: B017 - a refusal, to have one counted
        await mesh.service.submit(ALICE, envelope, b"x", {}, "http://broker.test")
    app = create_app(mesh.service, FakeAuthenticator(), mesh.settings, lambda: {"keys": []})
    add_telemetry_routes(app, mesh.broker)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker.test") as http:
        url = mesh.service.job(job_id).latest.data.removeprefix("http://broker.test")
        assert (await http.get(url)).status_code == 200
        broker_text = (await http.get("/metrics")).text
    agent_text = mesh.agent.telemetry.prometheus_text().decode()
    broker_families, broker_samples = exported_series(broker_text)
    agent_families, agent_samples = exported_series(agent_text)
    # Every declared metric is really exported once jobs ran, and nothing undeclared is.
    assert broker_families == set(BROKER_METRICS)
    assert agent_families == set(AGENT_METRICS)
    exported = broker_samples | agent_samples | PROMETHEUS_BUILTINS
    referenced = referenced_series()
    assert referenced["alerts.yml"] and referenced["grafana-dashboard.json"]
    for name, used in referenced.items():
        assert used <= exported, f"{name} uses metrics nobody exports: {used - exported}"
    everything = set().union(*referenced.values())
    for family in (*BROKER_METRICS, *AGENT_METRICS):  # each metric is on a panel or in an alert
        assert any(s == family or s.startswith(family + "_") for s in everything), family


def test_scrape_config_loads_the_alert_rules() -> None:
    config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"edif-broker", "edif-agent"}
    assert all(job["metrics_path"] == "/metrics" for job in jobs.values())
    alerts = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())
    names = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    assert {"EdifSiteDown", "EdifQueueStuck", "EdifErrorRateSpike", "EdifResultStoreFilling"} <= (
        names
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_the_wired_broker_serves_metrics_unless_turned_off(tmp_path, enabled) -> None:
    sites_yaml = tmp_path / "sites.yaml"
    sites_yaml.write_text('sites:\n  - name: site-a\n    address: "127.0.0.1:50051"\n')
    settings = settings_for(tmp_path, sites_file=sites_yaml, metrics_enabled=enabled)
    sites = FakeSiteClient({"site-a": describe("site-a", GPT2_KEY)})
    with TestClient(build_app(settings, site_client=sites)) as client:
        reply = client.get("/metrics")
    if not enabled:
        assert reply.status_code == 404
        return
    assert reply.status_code == 200
    assert 'edif_site_up{site="site-a"} 1.0' in reply.text
    assert "edif_result_store_free_bytes" in reply.text
