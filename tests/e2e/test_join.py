"""Joining and leaving end to end: `edif agent join` against the demo mesh's broker.

A fourth agent joins the running mesh: with a join token for another site it is refused and
never gets work; with its own it joins, serves, and `edif agent leave` drains it and takes it
out of /status for good (the demo's supervisor does not restart agents that left cleanly, and
these agents are not the supervisor's anyway).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from nnsight.intervention.backends.remote import RemoteBackend

from auth.roles import Role
from edif.demo import TINY_GPT2, load
from edif.up import free_port

pytestmark = pytest.mark.e2e

GPT2_SITES = {"ansbach-demo", "heilbronn-demo"}


def _site_yaml(tmp_path: Path, site: str) -> Path:
    path = tmp_path / f"{site}.yaml"
    model = {
        "repo_id": TINY_GPT2,
        "task": "text-generation",
        "source": "${EDIF_HOME}/models/" + TINY_GPT2,
        "dtype": "float32",
        "cpus": 0,
    }
    path.write_text(yaml.safe_dump({"site": site, "models": [model]}))
    return path


def _env(mesh, token: str | None = None) -> dict[str, str]:
    env = {**os.environ, "EDIF_HOME": str(mesh.home), "HF_HUB_OFFLINE": "1"}
    env.pop("EDIF_JOIN_TOKEN", None)
    if token:
        env["EDIF_JOIN_TOKEN"] = token
    return env


def _join(mesh, site_file: Path, token: str, log: Path) -> subprocess.Popen:
    argv = [
        *(sys.executable, "-m", "edif", "agent", "join", "--broker", mesh.url),
        *("--site", str(site_file), "--listen", f"127.0.0.1:{free_port()}"),
        *("--ray-address", mesh.state["ray_address"], "--drain-timeout", "5"),
    ]
    out = open(log, "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(argv, env=_env(mesh, token), stdout=out, stderr=subprocess.STDOUT)


def _entries(mesh, site: str) -> dict:
    deployments = httpx.get(f"{mesh.url}/status", timeout=10).json()["deployments"]
    return {name: d for name, d in deployments.items() if name.startswith(f"{site}/")}


def _run_gpt2(mesh) -> str:
    model = load(TINY_GPT2, home=mesh.home)
    backend = RemoteBackend(
        model.to_model_key(), host=mesh.url, api_key=mesh.token(), env=model._remoteable_get_env()
    )
    with model.trace("Hello", backend=backend):
        model.lm_head.output.save()
    return backend.meta["site"]


def test_join_token_for_another_site_is_refused(mesh, tmp_path) -> None:
    site_file = _site_yaml(tmp_path, "intruder-demo")
    token = mesh.issuer.issue("site:ansbach-demo", Role.SITE, 900, site="ansbach-demo")
    log = tmp_path / "intruder.log"
    proc = _join(mesh, site_file, token, log)
    try:
        assert proc.wait(timeout=90) == 1
    finally:
        proc.kill()
    output = log.read_text()
    assert "403" in output and "not 'intruder-demo'" in output, output
    assert token not in output  # the token is never echoed
    assert _entries(mesh, "intruder-demo") == {}
    assert _run_gpt2(mesh) in GPT2_SITES


def test_leave_drains_and_deregisters(mesh, tmp_path) -> None:
    site_file = _site_yaml(tmp_path, "leaver-demo")
    token = mesh.issuer.issue("site:leaver-demo", Role.SITE, 900, site="leaver-demo")
    log = tmp_path / "leaver.log"
    proc = _join(mesh, site_file, token, log)
    try:
        deadline = time.monotonic() + 120
        while not (entries := _entries(mesh, "leaver-demo")) or any(
            e["application_state"] != "RUNNING" for e in entries.values()
        ):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, entries
            time.sleep(0.5)
        assert "edif-agent ready site=leaver-demo" in log.read_text()
        leave = subprocess.run(
            [sys.executable, "-m", "edif", "agent", "leave", "--site", str(site_file)],
            env=_env(mesh),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert leave.returncode == 0, leave.stderr
        assert proc.wait(timeout=30) == 0
        assert "edif-agent left site=leaver-demo unfinished_jobs=0" in log.read_text()
        assert _entries(mesh, "leaver-demo") == {}
        assert not (mesh.home / "run" / "agent-leaver-demo.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
