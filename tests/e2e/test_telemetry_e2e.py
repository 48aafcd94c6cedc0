"""Telemetry in real processes: the demo broker's /metrics, and a broker started with JSON logs
and a traces file that runs one job with the real nnsight client.

The extra broker (like conftest's URL-only one) follows the same three agents through the
mesh's static sites file, with `EDIF_BROKER_LOG_FORMAT=json` and `EDIF_BROKER_TRACES_FILE`.
"""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest
import torch
from nnsight import CONFIG
from processes import BrokerProcess

from edif.demo import TINY_GPT2, load
from edif.up import free_port

pytestmark = pytest.mark.e2e

SUB = "telemetry-subject@uni-example.eu"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def json_broker(mesh):
    run = mesh.home / "run" / "broker-telemetry"
    broker = BrokerProcess(
        mesh.home,
        "broker-telemetry",
        free_port(),
        {"EDIF_BROKER_LOG_FORMAT": "json", "EDIF_BROKER_TRACES_FILE": str(run / "traces.jsonl")},
    )
    broker.start()
    try:
        _wait_models(broker.url, broker.proc)
        yield broker.url, run, broker.log_path
    finally:
        broker.stop()


def _wait_models(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited with {proc.returncode}")
        try:
            deployments = httpx.get(f"{url}/status", timeout=5).json().get("deployments", {})
            if deployments and all(
                d["application_state"] == "RUNNING" for d in deployments.values()
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no RUNNING models at {url}")


def run_job(mesh, url: str) -> torch.Tensor:
    CONFIG.API.HOST = url
    CONFIG.API.APIKEY = mesh.token(sub=SUB)
    CONFIG.API.COMPRESS = True
    model = load(TINY_GPT2, home=mesh.home)
    try:
        with model.trace(PROMPT, remote=True):
            logits = model.lm_head.output.save()
    finally:
        CONFIG.API.APIKEY = mesh.token()
    return logits


def sample(text: str, prefix: str) -> float:
    """The value of the first sample line starting with `prefix`."""
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return float(line.rsplit(" ", 1)[1])


def test_the_demo_broker_exports_edif_metrics(mesh) -> None:
    run_job(mesh, mesh.url)
    text = httpx.get(f"{mesh.url}/metrics", timeout=10).text
    assert sample(text, 'edif_jobs_total{status="completed"}') >= 1
    assert sample(text, "edif_queue_depth") >= 0
    up = [line for line in text.splitlines() if line.startswith("edif_site_up{")]
    assert len(up) == 3 and all(line.endswith(" 1.0") for line in up)
    assert SUB not in text


def test_json_logs_and_traces_name_the_job(mesh, json_broker) -> None:
    url, run, log_path = json_broker
    logits = run_job(mesh, url)
    assert logits.shape[-1] == 400
    deadline = time.monotonic() + 30  # spans leave in batches (BatchSpanProcessor: 5 s)
    spans: list[dict] = []
    while time.monotonic() < deadline:
        path = run / "traces.jsonl"
        spans = (
            [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        )
        if any(span["name"] == "edif.job" for span in spans):
            break
        time.sleep(0.5)
    job = next(span for span in spans if span["name"] == "edif.job")
    job_id = job["attributes"]["edif.job.id"]
    trace_id = job["context"]["trace_id"].removeprefix("0x")
    names = {s["name"] for s in spans if s["context"]["trace_id"] == job["context"]["trace_id"]}
    assert {"edif.queue_wait", "edif.dispatch", "edif.result.from_site"} <= names
    assert job["attributes"]["edif.outcome"] == "completed"
    entries = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    mine = [e for e in entries if e.get("job_id") == job_id]
    assert any("received" in e["msg"] for e in mine) and any("completed" in e["msg"] for e in mine)
    assert all(e["trace_id"] == trace_id for e in mine)
    assert SUB not in log_path.read_text()
