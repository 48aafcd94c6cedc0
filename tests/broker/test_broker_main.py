"""Wiring with the real auth classes, settings from the environment, and the sites file."""

from __future__ import annotations

import json

import pytest
from broker_fakes import GPT2_KEY, FakeSiteClient, decode, describe, load_result
from fastapi.testclient import TestClient

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer, TokenVerifier
from broker.config import BrokerSettings, load_sites_file
from broker.credentials import CachedSiteCredentials
from broker.main import build_app
from edif.clock import FakeClock
from edif.errors import ConfigError


@pytest.fixture
def sites_yaml(tmp_path):
    path = tmp_path / "sites.yaml"
    path.write_text('sites:\n  - name: site-a\n    address: "127.0.0.1:50051"\n')
    return path


def test_build_app_with_real_tokens(tmp_path, sites_yaml) -> None:
    settings = BrokerSettings(
        data_dir=tmp_path / "data", keys_dir=tmp_path / "keys", sites_file=sites_yaml
    )
    sites = FakeSiteClient({"site-a": describe("site-a", GPT2_KEY)})
    token = TokenIssuer(KeyStore(tmp_path / "keys")).issue(
        "alice@example.org", Role.RESEARCHER, 600
    )
    with TestClient(build_app(settings, site_client=sites)) as client:
        jwks = client.get("/.well-known/jwks.json").json()
        assert len(jwks["keys"]) == 1
        me = client.get("/whoami", headers={"ndif-api-key": token}).json()
        assert me == {"email": "alice@example.org", "tags": ["researcher"]}
        with client.websocket_connect("/subscribe", headers={"ndif-api-key": token}) as ws:
            session_id = json.loads(ws.receive_text())["session_id"]
            envelope = json.dumps({"model_key": GPT2_KEY, "session_id": session_id})
            reply = client.post(
                "/request",
                data={"data": envelope},
                files={"blob": ("request", b"blob", "application/octet-stream")},
                headers={"ndif-api-key": token, "nnsight-version": "0.8.1"},
            )
            assert reply.status_code == 200, reply.text
            while (frame := decode(_frame(ws.receive()))).status not in ("COMPLETED", "ERROR"):
                pass
        assert frame.status == "COMPLETED"
        assert list(load_result(frame.data)) == ["x"]
        forged = client.get("/whoami", headers={"ndif-api-key": "x.y.z"}).json()
        assert forged["email"] is None


def _frame(message: dict) -> str | bytes:
    return message["bytes"] if message.get("bytes") is not None else message["text"]


def test_site_credentials_are_per_site_and_cached(tmp_path) -> None:
    keys = KeyStore(tmp_path / "keys")
    clock = FakeClock()
    credentials = CachedSiteCredentials(TokenIssuer(keys, clock=clock), Role.BROKER, clock, 300)
    token = credentials.token_for("site-a")
    claims = TokenVerifier(keys, audience="edif-site:site-a", clock=clock).verify(token)
    assert claims.role is Role.BROKER
    assert credentials.token_for("site-a") == token
    assert credentials.token_for("site-b") != token
    clock.advance(239)
    assert credentials.token_for("site-a") == token
    clock.advance(2)
    assert credentials.token_for("site-a") != token


def test_settings_from_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("EDIF_BROKER_INLINE_MAX_BYTES", "0")
    monkeypatch.setenv("EDIF_BROKER_PUBLIC_URL", "https://edif.example.org/")
    monkeypatch.setenv("EDIF_BROKER_HEARTBEAT_S", "1")
    settings = BrokerSettings()
    assert settings.inline_max_bytes == 0
    assert settings.public_url == "https://edif.example.org"
    assert settings.heartbeat_s == 1.0
    with pytest.raises(ValueError):
        BrokerSettings(max_payload_bytes=10, grpc_max_message_bytes=10)


def test_sites_file(tmp_path, sites_yaml) -> None:
    [site] = load_sites_file(sites_yaml)
    assert (site.name, site.address) == ("site-a", "127.0.0.1:50051")
    bad = {
        "missing.yaml": None,
        "not-yaml.yaml": "sites: [",
        "no-port.yaml": "sites: [{name: a, address: localhost}]",
        "bad-name.yaml": "sites: [{name: 'a b', address: 'h:1'}]",
        "dupes.yaml": "sites: [{name: a, address: 'h:1'}, {name: a, address: 'h:2'}]",
        "extra.yaml": "sites: [{name: a, address: 'h:1', weight: 3}]",
    }
    for name, text in bad.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError, match=name):
            load_sites_file(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_sites_file(empty) == []


def test_the_broker_process_never_imports_nnsight() -> None:
    # nnsight's `.save` mount breaks Starlette's lazy anyio import (spec §11.4); the broker
    # builds ResponseModel frames itself, so it has no reason to import nnsight (or torch, until
    # an inline result is encoded).
    import subprocess
    import sys

    code = "import broker.main, sys; print('nnsight' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
