"""An HPC-style site with a short walltime: it drains, its job in flight is handed back and
completes at another site (`torch.equal` to local), and the site leaves /status and exits 0.

The agent joins the demo mesh hosting tiny-gpt2 beside ansbach-demo and heilbronn-demo. Its
name sorts first, so while every site is idle the broker's stable tie-break sends the job
there. `--walltime 3:00` with `drain_margin_s: 100` puts the drain 80 s after the agent starts
(time enough to load on a busy machine); the agent prints the exact moment, and the test starts
a job a few seconds before it so the job is running when the drain begins. The job spins for
about six seconds at the sites' current speed (measured just before with a tiny-llama job at
heilbronn-demo, so this site has timed nothing yet): long enough to span the drain, short
enough for the demo sites' 15 s limit when it runs again. A job that has
never been timed on this site is expected to need its full time limit, more than is left before
the hand-back time, so the agent hands it back at once (SITE_DRAINING) and the broker re-runs it
elsewhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from nnsight import CONFIG
from nnsight.intervention.backends.remote import RemoteBackend

from auth.roles import Role
from edif.demo import TINY_GPT2, TINY_LLAMA, load
from edif.up import free_port

pytestmark = pytest.mark.e2e

SITE = "aaa-hpc-demo"  # sorts before ansbach-demo: idle ties go here
PROMPT = "The capital of France is"
OTHER_GPT2_SITES = {"ansbach-demo", "heilbronn-demo"}


def _site_yaml(tmp_path: Path) -> Path:
    path = tmp_path / f"{SITE}.yaml"
    model = {
        "repo_id": TINY_GPT2,
        "task": "text-generation",
        "source": "${EDIF_HOME}/models/" + TINY_GPT2,
        "dtype": "float32",
        "cpus": 0,
    }
    walltime = {"drain_margin_s": 100, "handback_margin_s": 90}
    path.write_text(yaml.safe_dump({"site": SITE, "walltime": walltime, "models": [model]}))
    return path


def _entries(mesh) -> dict:
    deployments = httpx.get(f"{mesh.url}/status", timeout=10).json()["deployments"]
    return {name: d for name, d in deployments.items() if name.startswith(f"{SITE}/")}


def _site_spins_per_second(mesh, token: str) -> int:
    """How fast a site's worker counts in pure Python right now (the machine is shared)."""
    llama = load(TINY_LLAMA, home=mesh.home)
    backend = RemoteBackend(
        llama.to_model_key(), host=mesh.url, api_key=token, env=llama._remoteable_get_env()
    )
    with llama.trace(PROMPT, backend=backend):
        spin = 0
        while spin < 2_000_000:
            spin += 1
        llama.lm_head.output.save()
    assert backend.meta["site"] == "heilbronn-demo", backend.meta
    return int(2_000_000 / backend.meta["execution_s"])


def _poll(mesh, job_id: str, token: str) -> dict:
    reply = httpx.get(f"{mesh.url}/response/{job_id}", headers={"ndif-api-key": token}, timeout=10)
    return reply.json() if reply.status_code == 200 else {}


def test_walltime_drain_hands_back_the_running_job(mesh, tmp_path) -> None:
    site = mesh.issuer.issue(f"site:{SITE}", Role.SITE, 900, site=SITE)
    env = {**os.environ, "EDIF_HOME": str(mesh.home), "HF_HUB_OFFLINE": "1"}
    env["EDIF_JOIN_TOKEN"] = site
    log = tmp_path / "hpc.log"
    argv = [
        *(sys.executable, "-m", "edif", "agent", "join", "--broker", mesh.url),
        *("--site", str(_site_yaml(tmp_path)), "--listen", f"127.0.0.1:{free_port()}"),
        *("--ray-address", mesh.state["ray_address"], "--walltime", "3:00"),
    ]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 75
        while not (entries := _entries(mesh)) or any(
            e["application_state"] != "RUNNING" for e in entries.values()
        ):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, entries
            time.sleep(0.5)
        drain_at = float(re.search(r"drain_at=([\d.]+)", log.read_text()).group(1))
        token = mesh.token("erin@uni-example.eu", groups=("tum",))  # tiny-llama: heilbronn
        CONFIG.API.HOST, CONFIG.API.APIKEY = mesh.url, token
        CONFIG.APP.REMOTE_LOGGING = False
        remote = load(TINY_GPT2, home=mesh.home)
        local = load(TINY_GPT2, home=mesh.home, dispatch=True)
        spins = _site_spins_per_second(mesh, token) * 6
        assert drain_at - time.time() > 4, "the agent took too long to load"
        time.sleep(max(0.0, drain_at - time.time() - 3))
        with remote.trace(PROMPT, remote=True, blocking=False) as tracer:
            spin = 0
            while spin < spins:  # about six seconds of pure Python: spans the drain
                spin += 1
            logits = remote.lm_head.output.save()  # noqa: F841
        job_id = tracer.backend.job_id
        assert time.time() < drain_at - 1, "submitting took too long"
        seen = []
        while (latest := _poll(mesh, job_id, token)).get("status") != "RUNNING":
            seen.append(latest.get("description"))
            assert time.time() < drain_at, latest
            time.sleep(0.02)
        running_at = latest["description"]
        assert running_at == f"Your job is running at site {SITE}.", (seen, log.read_text())
        assert time.time() < drain_at  # in flight when the drain begins

        result = None
        while result is None:
            assert time.time() - drain_at < 60, _poll(mesh, job_id, token)
            result = tracer.backend()
            time.sleep(0.05)
        assert tracer.backend.meta["site"] in OTHER_GPT2_SITES
        with local.trace(PROMPT):
            expected = local.lm_head.output.save()
        assert torch.equal(result["logits"], expected)

        assert proc.wait(timeout=60) == 0
        output = log.read_text()
        assert f"edif-agent draining site={SITE}" in output
        assert "handing back 1 job(s)" in output
        assert f"edif-agent left site={SITE} unfinished_jobs=0" in output
        assert _entries(mesh) == {}
    finally:
        CONFIG.APP.REMOTE_LOGGING = True
        if proc.poll() is None:
            proc.kill()
            proc.wait()
