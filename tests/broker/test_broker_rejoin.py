"""`POST /sites/{site}/rejoin` with a stored site credential, and TLS pins recorded at (re)join."""

from __future__ import annotations

import json

import jwt
import pytest
from broker_fakes import settings_for
from fastapi.testclient import TestClient

from auth.keys import KeyStore
from auth.revocation import RevocationList
from auth.roles import Role
from auth.tokens import TokenIssuer
from broker.main import build_app
from broker.site_tls import SiteTlsPins, TlsOffer
from edif.clock import FakeClock

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
BODY = {"site": "site-x", "address": "127.0.0.1:50099"}
TLS_BODY = {**BODY, "tls": {"trust_pem": PEM, "server_name": "site-x.example"}}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.delenv("EDIF_CONSUL_ADDR", raising=False)
    clock = FakeClock()
    settings = settings_for(tmp_path, site_credential_ttl_s=3600)
    app = build_app(settings, clock=clock)
    issuer = TokenIssuer(KeyStore(tmp_path / "keys"), clock=clock)
    return TestClient(app), issuer, clock, settings


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_rejoin_with_the_credential_after_the_join_token_expired(setup) -> None:
    client, issuer, clock, _ = setup
    join_token = issuer.issue("site:site-x", Role.SITE, 900, site="site-x")
    first = client.post("/sites/join", json=BODY, headers=_auth(join_token))
    credential = first.json()["credential"]
    clock.advance(1800)  # the join token is long expired, the credential is not
    assert client.post("/sites/join", json=BODY, headers=_auth(join_token)).status_code == 401
    again = client.post("/sites/site-x/rejoin", json=BODY, headers=_auth(credential))
    assert again.status_code == 200, again.text
    assert again.json()["credential"] != credential and again.json()["jwks"]["keys"]
    # A join token is no site credential; another site's path or body is refused.
    assert (
        client.post("/sites/site-x/rejoin", json=BODY, headers=_auth(join_token)).status_code == 401
    )
    body_y = {**BODY, "site": "site-y"}
    assert (
        client.post("/sites/site-x/rejoin", json=body_y, headers=_auth(credential)).status_code
        == 403
    )
    assert (
        client.post("/sites/site-y/rejoin", json=body_y, headers=_auth(credential)).status_code
        == 403
    )
    clock.advance(3600)  # now the credential has expired too: only a new join token helps
    assert (
        client.post("/sites/site-x/rejoin", json=BODY, headers=_auth(credential)).status_code == 401
    )


def test_tls_offer_is_pinned_on_disk_and_dropped_by_a_plaintext_rejoin(setup) -> None:
    client, issuer, _, settings = setup
    join_token = issuer.issue("site:site-x", Role.SITE, 900, site="site-x")
    reply = client.post("/sites/join", json=TLS_BODY, headers=_auth(join_token))
    assert reply.status_code == 200, reply.text
    pin = settings.data_dir / "site-tls" / "site-x.json"
    assert json.loads(pin.read_text())["server_name"] == "site-x.example"
    # A restarted broker reads the pin back (the site re-registers without joining again).
    security = SiteTlsPins(settings.data_dir / "site-tls").channel_security("site-x")
    assert security is not None and security.root_pem == PEM.encode()
    assert security.server_name == "site-x.example" and "pinned" in security.source
    credential = reply.json()["credential"]
    assert (
        client.post("/sites/site-x/rejoin", json=BODY, headers=_auth(credential)).status_code == 200
    )
    assert not pin.exists()
    assert SiteTlsPins(settings.data_dir / "site-tls").channel_security("site-x") is None


def test_broker_ca_bundle_wins_over_the_pin(tmp_path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text(PEM.replace("MIIB", "MIIC"))
    pins = SiteTlsPins(tmp_path / "pins", ca_file=bundle)
    pins.record("site-x", TlsOffer(trust_pem=PEM))
    security = pins.channel_security("site-x")
    assert security.root_pem == bundle.read_bytes() and str(bundle) in security.source
    assert pins.channel_security("site-y") is None  # never joined with TLS: plaintext


def test_a_revoked_credential_or_join_token_is_refused(setup) -> None:
    """`edif token revoke` (auth.revocation) applies to a site's join token and credential."""
    client, issuer, clock, settings = setup
    join_token = issuer.issue("site:site-x", Role.SITE, 900, site="site-x")
    credential = client.post("/sites/join", json=BODY, headers=_auth(join_token)).json()[
        "credential"
    ]
    renewed = client.post("/sites/site-x/rejoin", json=BODY, headers=_auth(credential))
    assert renewed.status_code == 200
    revocations = RevocationList(settings.keys_dir, clock)
    for token in (credential, join_token):
        claims = jwt.decode(token, options={"verify_signature": False})
        revocations.revoke(claims["jti"], claims["exp"])
    refused = client.post("/sites/site-x/rejoin", json=BODY, headers=_auth(credential))
    assert refused.status_code == 401 and "revoked" in refused.text
    assert client.post("/sites/site-x/heartbeat", headers=_auth(credential)).status_code == 401
    assert client.post("/sites/join", json=BODY, headers=_auth(join_token)).status_code == 401
    # A credential the broker issued before the revocation is not revoked with it.
    other = renewed.json()["credential"]
    assert client.post("/sites/site-x/rejoin", json=BODY, headers=_auth(other)).status_code == 200
