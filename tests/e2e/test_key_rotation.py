"""Key rotation and an external OIDC issuer, end to end with the real nnsight 0.8.1 client.

This module starts its own mesh (`edif up --demo` in its own EDIF_HOME), because it changes
the mesh's keys and its broker must trust a local OIDC provider from start-up: a `FakeIdP`
(tests/auth/fake_oidc.py) serving a real JWKS on 127.0.0.1. Short lifetimes make a rotation
visible within the test: the broker re-signs its credentials for the sites every few
seconds and the sites renew their own every 30 s, so both are on the new key long before the
grace period (GRACE_S) ends. The rotation itself is the real `edif key rotate` command in
another process; nothing is restarted.

Shown: a token of the old key works during the grace period and is refused after it with a
message the client prints; a token of the new key works; a token from the trusted external
issuer runs a trace whose result is `torch.equal` to a local run; a token from an unknown
issuer is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from nnsight import CONFIG
from nnsight.intervention.backends.remote import RemoteError
from processes import stop_process

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from edif.demo import TINY_GPT2, load

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "auth"))
from fake_oidc import FakeIdP  # noqa: E402 - a test helper shared with tests/auth

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"
GRACE_S = 45
TIME_LIMIT_S = 15.0

torch.set_num_threads(1)  # bit-identity with the demo sites' single-threaded workers


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"edif up exited with {proc.returncode} while waiting for {what}")
        try:
            value = predicate()
        except (OSError, ValueError, httpx.HTTPError):
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


def _all_running(url: str) -> bool:
    deployments = httpx.get(f"{url}/status", timeout=5).json().get("deployments", {})
    states = [d["application_state"] for d in deployments.values()]
    return len(states) >= 4 and all(s == "RUNNING" for s in states)


@pytest.fixture(scope="module")
def idp():
    with FakeIdP(issuer="https://login.uni-example.eu/realms/uni") as server:
        server.add_key("ES256")
        yield server


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, idp: FakeIdP):
    home = tmp_path_factory.mktemp("edif-rotation")
    state_file = home / "mesh.json"
    external = {
        "name": "uni",
        "issuer": idp.issuer,
        "jwks_url": idp.jwks_url,
        "audience": "edif",
        "algorithms": ["ES256"],
        "claims": {"sub": "email", "groups": "groups"},
        "groups": ["uni-example"],
    }
    env = {
        **os.environ,
        "EDIF_HOME": str(home),
        "EDIF_BROKER_EXTERNAL_ISSUERS": json.dumps([external]),
        "EDIF_BROKER_SITE_TOKEN_TTL_S": "5",  # broker → site credentials re-signed every 4 s
        "EDIF_BROKER_SITE_CREDENTIAL_TTL_S": "60",  # sites renew theirs every 30 s
        "EDIF_BROKER_KEY_GRACE_S": str(GRACE_S),
    }
    argv = [sys.executable, "-m", "edif", "up", "--demo", "--state-file", str(state_file)]
    argv += ["--time-limit", str(TIME_LIMIT_S), "--heartbeat", "1"]
    out = open(home / "edif-up.log", "ab")  # noqa: SIM115
    up = subprocess.Popen(
        argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        state = _wait(
            lambda: state_file.exists() and json.loads(state_file.read_text()), 180, "mesh", up
        )
        _wait(lambda: _all_running(state["broker_url"]), 240, "models RUNNING", up)
        yield {"home": home, "url": state["broker_url"], "env": env}
    finally:
        stop_process(up)


@pytest.fixture(scope="module")
def gpt2(mesh):
    return load(TINY_GPT2, home=mesh["home"]), load(TINY_GPT2, home=mesh["home"], dispatch=True)


@pytest.fixture(scope="module")
def expected(gpt2):
    _, local = gpt2
    with local.trace(PROMPT):
        logits = local.lm_head.output.save()
    return logits


@pytest.fixture(autouse=True)
def _host(mesh):
    CONFIG.API.HOST = mesh["url"]
    CONFIG.API.COMPRESS = True


def _issue(mesh, sub: str) -> str:
    return TokenIssuer(KeyStore(mesh["home"] / "keys")).issue(sub, Role.RESEARCHER, 3600)


def _run_remote(gpt2, token: str) -> torch.Tensor:
    remote, _ = gpt2
    CONFIG.API.APIKEY = token
    with remote.trace(PROMPT, remote=True):
        logits = remote.lm_head.output.save()
    return logits


def _refused(gpt2, token: str) -> str:
    with pytest.raises(RemoteError) as info:
        _run_remote(gpt2, token)
    return str(info.value)


def _jwks_kids(mesh) -> set[str]:
    keys = httpx.get(f"{mesh['url']}/.well-known/jwks.json", timeout=5).json()["keys"]
    return {key["kid"] for key in keys}


class State:
    """What the ordered tests below hand on to each other."""

    old_token: str = ""
    new_token: str = ""
    old_kid: str = ""
    new_kid: str = ""
    rotated_at: float = 0.0


def test_rotation_keeps_old_tokens_during_grace(mesh, gpt2, expected):
    State.old_token = _issue(mesh, "alice@uni-example.eu")
    State.old_kid = KeyStore(mesh["home"] / "keys").signing_key()[0]
    assert torch.equal(_run_remote(gpt2, State.old_token), expected)

    rotate = subprocess.run(
        [sys.executable, "-m", "edif", "key", "rotate"],
        env=mesh["env"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    State.rotated_at = time.monotonic()
    State.new_kid = rotate.stdout.strip()
    assert f"{GRACE_S}s" in rotate.stderr
    assert _jwks_kids(mesh) == {State.old_kid, State.new_kid}  # no broker restart

    State.new_token = _issue(mesh, "bob@uni-example.eu")
    assert torch.equal(_run_remote(gpt2, State.new_token), expected)
    assert torch.equal(_run_remote(gpt2, State.old_token), expected)  # grace


def test_external_issuer_token_runs_a_trace(mesh, gpt2, expected, idp):
    kid = next(iter(idp.keys))
    token = idp.token(kid, audience="edif", groups=["proj-x"])
    assert torch.equal(_run_remote(gpt2, token), expected)
    who = httpx.get(f"{mesh['url']}/whoami", headers={"ndif-api-key": token}, timeout=5).json()
    assert who["email"] == "uni:alice@uni-example.eu"


def test_unknown_issuer_is_refused(gpt2):
    with FakeIdP(issuer="https://idp.not-trusted.example") as stranger:
        token = stranger.token(stranger.add_key("ES256"), audience="edif")
        message = _refused(gpt2, token)
    assert "does not trust" in message, message


def test_old_key_is_refused_after_grace_and_new_key_still_works(mesh, gpt2, expected):
    assert State.rotated_at, "runs after test_rotation_keeps_old_tokens_during_grace"
    time.sleep(max(0.0, State.rotated_at + GRACE_S + 2 - time.monotonic()))

    message = _refused(gpt2, State.old_token)
    assert "retired" in message and "grace period is over" in message, message
    assert _jwks_kids(mesh) == {State.new_kid}
    # The sites renewed their own credentials on the new key during the grace period, so
    # their heartbeats still count (a few heartbeat TTLs later they are all RUNNING), and
    # they accept the broker's new-key credentials: the new token's trace still runs.
    time.sleep(8)
    assert _all_running(mesh["url"]), httpx.get(f"{mesh['url']}/status", timeout=5).text
    assert torch.equal(_run_remote(gpt2, State.new_token), expected)
    listing = subprocess.run(
        [sys.executable, "-m", "edif", "key", "list"],
        env=mesh["env"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    states = {line.split()[0]: line.split()[3] for line in listing.splitlines()[1:]}
    assert states == {State.new_kid: "active", State.old_kid: "retired"}
