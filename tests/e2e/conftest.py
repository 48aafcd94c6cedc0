"""A real mesh for end-to-end tests: `edif up --demo` as a subprocess, plus a second broker.

The first broker delivers small results inline (binary websocket frame); the second, started
against the same three agents, has an inline limit of 0 and so delivers every result by URL.
Conformance tests run against both. Researchers' tokens are issued with the mesh's own keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from processes import BrokerProcess, stop_process

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from edif.up import free_port

TIME_LIMIT_S = 15.0
PLANTED_SECRET = "EDIF_TEST_PLANTED_API_TOKEN"

# Bit-identity on CPU needs the same intra-op thread count as the site's workers (the demo
# sites run torch with 1 thread): with 2 threads some matmuls reduce in another order and
# differ in the last bit (measured: 1.8e-7 on a patched logit row).
torch.set_num_threads(1)


@dataclass
class Mesh:
    home: Path
    url: str  # inline delivery
    url_only: str  # URL delivery
    state: dict
    issuer: TokenIssuer

    def token(
        self,
        sub: str = "alice@uni-example.eu",
        role: Role = Role.RESEARCHER,
        ttl_s: int = 3600,
        groups: tuple[str, ...] = (),
    ) -> str:
        return self.issuer.issue(sub, role, ttl_s, groups=groups)

    def log(self, name: str) -> str:
        path = Path(self.state["logs_dir"]) / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _wait_file(path: Path, proc: subprocess.Popen, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"edif up exited with {proc.returncode}")
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.2)
    raise RuntimeError("edif up did not become ready")


def _wait_running(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    deployments: dict = {}
    while time.monotonic() < deadline:
        try:
            deployments = httpx.get(f"{url}/status", timeout=5).json().get("deployments", {})
        except httpx.HTTPError:  # still starting
            time.sleep(0.5)
            continue
        states = [d["application_state"] for d in deployments.values()]
        if len(states) >= 4 and all(s == "RUNNING" for s in states):
            return
        time.sleep(0.5)
    raise RuntimeError(f"models not RUNNING at {url}: {deployments}")


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("edif-home")
    state_file = home / "mesh.json"
    # A secret in the operator's environment must never reach a model worker.
    env = {**os.environ, "EDIF_HOME": str(home), PLANTED_SECRET: "hunter2-planted"}
    argv = [
        sys.executable,
        "-m",
        "edif",
        "up",
        "--demo",
        "--state-file",
        str(state_file),
        "--time-limit",
        str(TIME_LIMIT_S),
        "--heartbeat",
        "1",
    ]
    out = open(home / "edif-up.log", "ab")  # noqa: SIM115
    up = subprocess.Popen(
        argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    url_only: BrokerProcess | None = None
    try:
        state = _wait_file(state_file, up, 180)
        # A second broker over the same sites that always delivers results by URL. Its port is
        # picked only now: `edif up` binds ports of its own while it starts.
        url_only = BrokerProcess(
            home,
            "broker-url-only",
            free_port(),
            {"EDIF_BROKER_INLINE_MAX_BYTES": "0"},
            logs=Path(state["logs_dir"]),
        ).start()
        _wait_running(state["broker_url"], 240)
        _wait_running(url_only.url, 60)
        issuer = TokenIssuer(KeyStore(home / "keys"))
        yield Mesh(home, state["broker_url"], url_only.url, state, issuer)
    finally:
        if url_only is not None:
            url_only.stop()
        stop_process(up)
