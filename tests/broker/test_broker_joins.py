"""Joining sites: `POST /sites/join` and the embedded catalog's agent calls, through the app."""

from __future__ import annotations

import pytest
from broker_fakes import settings_for
from fastapi.testclient import TestClient

from auth.keys import KeyStore, public_keys_from_jwks
from auth.roles import Role
from auth.tokens import TokenIssuer, TokenVerifier
from broker.main import build_app
from edif.clock import FakeClock
from registry.model import Hardware, SiteRecord, Versions

BODY = {"site": "site-x", "address": "127.0.0.1:50099", "institution": "Example"}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.delenv("EDIF_CONSUL_ADDR", raising=False)
    clock = FakeClock()
    settings = settings_for(tmp_path, site_heartbeat_ttl_s=3.0, site_deregister_after_s=10.0)
    app = build_app(settings, clock=clock)
    issuer = TokenIssuer(KeyStore(tmp_path / "keys"), clock=clock)
    return TestClient(app), issuer, clock, app.state.registry


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _join(client: TestClient, token: str, body: dict = BODY):
    return client.post("/sites/join", json=body, headers=_auth(token))


def _record(site: str = "site-x") -> dict:
    versions = Versions(nnsight="0.8.1", torch="2", transformers="5", python="3.11")
    hardware = Hardware(vendor="cpu", device_type="cpu", count=1)
    record = SiteRecord(
        site=site,
        institution="Example",
        grpc_address="127.0.0.1:50099",
        agent_version="0",
        versions=versions,
        hardware=hardware,
    )
    return record.model_dump(mode="json")


def test_good_join_token_gets_keys_credential_and_catalog_rules(setup) -> None:
    client, issuer, clock, _ = setup
    reply = _join(client, issuer.issue("site:site-x", Role.SITE, 900, site="site-x"))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["site"] == "site-x" and body["issuer"] == "edif"
    assert body["catalog"] == {"kind": "embedded", "address": None}
    assert (body["heartbeat_ttl_s"], body["deregister_after_s"]) == (3.0, 10.0)
    assert body["credential_expires_in_s"] == 24 * 3600
    keys = public_keys_from_jwks(body["jwks"])
    verifier = TokenVerifier(keys, audience="edif-broker-sites", clock=clock)
    claims = verifier.verify(body["credential"])
    assert (claims.role, claims.site) == (Role.SITE, "site-x")


@pytest.mark.parametrize(
    ("role", "site"), [(Role.SITE, "site-y"), (Role.RESEARCHER, None), (Role.ADMIN, None)]
)
def test_token_for_another_site_or_role_is_refused_403(setup, role, site) -> None:
    client, issuer, _, registry = setup
    reply = _join(client, issuer.issue("someone", role, 900, site=site))
    assert reply.status_code == 403, reply.text


def test_expired_or_missing_join_token_is_401(setup) -> None:
    client, issuer, clock, _ = setup
    token = issuer.issue("site:site-x", Role.SITE, 60, site="site-x")
    clock.advance(3600)
    assert _join(client, token).status_code == 401
    assert client.post("/sites/join", json=BODY).status_code == 401


def test_bad_address_is_400(setup) -> None:
    client, issuer, _, _ = setup
    token = issuer.issue("site:site-x", Role.SITE, 900, site="site-x")
    assert _join(client, token, {**BODY, "address": "no-port"}).status_code == 400


async def test_register_heartbeat_leave_with_the_site_credential(setup) -> None:
    client, issuer, clock, registry = setup
    join_token = issuer.issue("site:site-x", Role.SITE, 900, site="site-x")
    credential = _join(client, join_token).json()["credential"]
    # Heartbeat before registering: the catalog does not know the site (agent registers).
    assert client.post("/sites/site-x/heartbeat", headers=_auth(credential)).status_code == 404
    reply = client.post("/sites/site-x/register", json=_record(), headers=_auth(credential))
    assert reply.status_code == 204, reply.text
    assert [r.site for r in await registry.snapshot()] == ["site-x"]
    assert client.post("/sites/site-x/heartbeat", headers=_auth(credential)).status_code == 204
    # The join token is not a site credential (other audience); nor is another site's.
    assert client.post("/sites/site-x/heartbeat", headers=_auth(join_token)).status_code == 401
    other = client.post("/sites/site-x/register", json=_record("site-y"), headers=_auth(credential))
    assert other.status_code == 403
    assert client.post("/sites/site-y/leave", headers=_auth(credential)).status_code == 403
    renewed = client.post("/sites/site-x/credential", headers=_auth(credential))
    assert renewed.status_code == 200 and renewed.json()["credential"]
    assert client.post("/sites/site-x/leave", headers=_auth(credential)).status_code == 204
    assert await registry.snapshot() == []
