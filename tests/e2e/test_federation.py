"""Federation end to end: routing by model, site sovereignty, failover after kill -9, rejoin.

The demo mesh has three sites: ansbach-demo (tiny-gpt2), fau-demo (tiny-llama, FAU group only)
and heilbronn-demo (both). `edif up` supervises its agents like a service manager, so a killed
agent comes back by itself and rejoins.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch
from nnsight import CONFIG
from nnsight.intervention.backends.remote import RemoteBackend

from edif.demo import TINY_GPT2, TINY_LLAMA, load

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"
GPT2_SITES = {"ansbach-demo", "heilbronn-demo"}


@pytest.fixture(autouse=True)
def _client(mesh):
    CONFIG.API.HOST = mesh.url
    CONFIG.API.APIKEY = mesh.token()
    CONFIG.API.COMPRESS = True
    CONFIG.APP.REMOTE_LOGGING = False
    yield
    CONFIG.APP.REMOTE_LOGGING = True


def run_on_site(model, token: str, mesh) -> tuple[str, torch.Tensor]:
    backend = RemoteBackend(
        model.to_model_key(), host=mesh.url, api_key=token, env=model._remoteable_get_env()
    )
    with model.trace(PROMPT, backend=backend):
        logits = model.lm_head.output.save()
    return backend.meta["site"], logits


def local_logits(local) -> torch.Tensor:
    with local.trace(PROMPT):
        logits = local.lm_head.output.save()
    return logits


def test_routing_by_model_and_sovereignty(mesh) -> None:
    gpt2, llama = load(TINY_GPT2, home=mesh.home), load(TINY_LLAMA, home=mesh.home)
    site, _ = run_on_site(gpt2, mesh.token(), mesh)
    assert site in GPT2_SITES
    # fau-demo serves the "fau" group only: everyone else's llama jobs go to Heilbronn ...
    outsider = mesh.token("bob@tum-example.de", groups=("tum",))
    assert {run_on_site(llama, outsider, mesh)[0] for _ in range(3)} == {"heilbronn-demo"}
    # ... and FAU's researchers may use both (an idle fau-demo wins the stable tie-break).
    insider = mesh.token("carol@fau-example.de", groups=("fau",))
    site, logits = run_on_site(llama, insider, mesh)
    assert site == "fau-demo"
    assert torch.equal(logits, local_logits(load(TINY_LLAMA, home=mesh.home, dispatch=True)))


def _state(mesh) -> dict:
    return json.loads((Path(mesh.home) / "mesh.json").read_text())


def _poll_latest(mesh, job_id: str, token: str) -> dict:
    reply = httpx.get(f"{mesh.url}/response/{job_id}", headers={"ndif-api-key": token}, timeout=10)
    return reply.json() if reply.status_code == 200 else {}


def _deployments(mesh) -> dict:
    return httpx.get(f"{mesh.url}/status", timeout=10).json()["deployments"]


def test_kill_9_mid_job_completes_elsewhere_and_site_rejoins(mesh) -> None:
    token = mesh.token("dora@uni-example.eu")
    CONFIG.API.APIKEY = token
    remote = load(TINY_GPT2, home=mesh.home)
    with remote.trace(PROMPT, remote=True, blocking=False) as tracer:
        spin = 0
        while spin < 8_000_000:  # about a second of pure Python: time to kill the site
            spin += 1
        logits = remote.lm_head.output.save()  # noqa: F841
    job_id = tracer.backend.job_id
    deadline = time.monotonic() + 30
    while (latest := _poll_latest(mesh, job_id, token)).get("status") != "RUNNING":
        assert time.monotonic() < deadline, latest
        time.sleep(0.02)
    victim = latest["description"].removeprefix("Your job is running at site ").rstrip(".")
    assert victim in GPT2_SITES, latest
    os.kill(_state(mesh)["agents"][victim]["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    result = None
    while result is None:
        assert time.monotonic() - killed_at < 60, _poll_latest(mesh, job_id, token)
        result = tracer.backend()
        time.sleep(0.05)
    survivor = tracer.backend.meta["site"]
    assert survivor in GPT2_SITES - {victim}
    assert torch.equal(
        result["logits"], local_logits(load(TINY_GPT2, home=mesh.home, dispatch=True))
    )

    # The killed site leaves the service status (COLD, not RUNNING) ...
    gone = [d for n, d in _deployments(mesh).items() if n.startswith(victim)]
    assert gone and all(d["application_state"] != "RUNNING" for d in gone)
    # ... and comes back once its agent has been restarted and answers again.
    deadline = time.monotonic() + 120
    while True:
        back = [d for n, d in _deployments(mesh).items() if n.startswith(victim)]
        if back and all(d["application_state"] == "RUNNING" for d in back):
            break
        assert time.monotonic() < deadline, back
        time.sleep(0.5)
    site, logits = run_on_site(remote, token, mesh)
    assert site in GPT2_SITES
