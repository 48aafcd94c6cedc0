"""Joining and leaving end to end: `edif agent join` against the demo mesh's broker.

A fourth agent joins the running mesh: with a join token for another site it is refused and
never gets work; with its own it joins, serves, and `edif agent leave` drains it and takes it
out of /status for good (the demo's supervisor does not restart agents that left cleanly, and
these agents are not the supervisor's anyway). Restarted with an expired join token, an agent
rejoins with the site credential it stored; without that credential it says what to do.
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

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from edif.clock import FakeClock
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


def _join(mesh, site_file: Path, token: str, log: Path, *extra: str) -> subprocess.Popen:
    argv = [
        *(sys.executable, "-m", "edif", "agent", "join", "--broker", mesh.url),
        *("--site", str(site_file), "--listen", f"127.0.0.1:{free_port()}"),
        *("--ray-address", mesh.state["ray_address"], "--drain-timeout", "5", *extra),
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
        _wait_running(mesh, proc, "leaver-demo", log)
        assert "edif-agent ready site=leaver-demo" in log.read_text()
        _leave(mesh, site_file, proc)
        assert "edif-agent left site=leaver-demo unfinished_jobs=0" in log.read_text()
        assert _entries(mesh, "leaver-demo") == {}
        assert not (mesh.home / "run" / "agent-leaver-demo.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_running(mesh, proc: subprocess.Popen, site: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while not (entries := _entries(mesh, site)) or any(
        e["application_state"] != "RUNNING" for e in entries.values()
    ):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, entries
        time.sleep(0.5)


def _leave(mesh, site_file: Path, proc: subprocess.Popen) -> None:
    leave = subprocess.run(
        [sys.executable, "-m", "edif", "agent", "leave", "--site", str(site_file)],
        env=_env(mesh),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert leave.returncode == 0, leave.stderr
    assert proc.wait(timeout=30) == 0


def test_restart_rejoins_with_the_stored_credential_after_the_token_expired(mesh, tmp_path) -> None:
    site = "rejoiner-demo"
    site_file = _site_yaml(tmp_path, site)
    fresh = mesh.issuer.issue(f"site:{site}", Role.SITE, 900, site=site)
    # A join token that expired an hour ago (issued by the mesh's keys, with a clock behind).
    past = TokenIssuer(KeyStore(mesh.home / "keys"), clock=FakeClock(time.time() - 4000))
    expired = past.issue(f"site:{site}", Role.SITE, 900, site=site)
    stored = mesh.home / "agent" / site / "credential.json"
    log = tmp_path / "rejoiner.log"
    procs = []
    try:
        procs.append(proc := _join(mesh, site_file, fresh, log))
        _wait_running(mesh, proc, site, log)
        assert stored.stat().st_mode & 0o777 == 0o600
        assert fresh not in log.read_text()
        _leave(mesh, site_file, proc)
        assert _entries(mesh, site) == {}

        # Restart with only the expired join token: the stored credential gets it back in.
        procs.append(proc := _join(mesh, site_file, expired, log))
        _wait_running(mesh, proc, site, log)
        assert "rejoined with the stored site credential site=rejoiner-demo" in log.read_text()
        _leave(mesh, site_file, proc)

        # A new machine of the same site (no stored credential) with the expired token: a
        # clear refusal that says how to get back in, and the site stays out.
        empty = tmp_path / "fresh-state"
        other_log = tmp_path / "no-credential.log"
        procs.append(proc := _join(mesh, site_file, expired, other_log, "--state-dir", str(empty)))
        assert proc.wait(timeout=90) == 1
        output = other_log.read_text()
        assert "the join token was refused" in output and "none is stored" in output, output
        assert f"edif token issue --role site --site {site}" in output
        assert expired not in output
        assert _entries(mesh, site) == {}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
