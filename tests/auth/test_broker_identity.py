"""The broker's wiring (`build_app`) with key rotation and an external OIDC issuer.

The "CLI" here is a second KeyStore on the same folder, as `edif key rotate` in another process
would be; the broker must follow it without a restart: JWKS, verification, the 401 message.
"""

from __future__ import annotations

import pytest
from fake_oidc import FakeIdP
from fastapi.testclient import TestClient

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from broker.config import BrokerSettings
from broker.main import build_app
from edif.clock import FakeClock

DAY = 86400.0


@pytest.fixture
def idp():
    with FakeIdP() as server:
        yield server


def _settings(tmp_path, idp: FakeIdP) -> BrokerSettings:
    external = {
        "name": "uni",
        "issuer": idp.issuer,
        "jwks_url": idp.jwks_url,
        "audience": "edif",
        "algorithms": ["ES256"],
        "claims": {"sub": "email", "groups": "groups"},
        "groups": ["uni-example"],
    }
    return BrokerSettings(
        data_dir=tmp_path / "data",
        keys_dir=tmp_path / "keys",
        external_issuers=[external],
        audit_enabled=False,
    )


def _refusal(client: TestClient, token: str) -> str:
    reply = client.post("/request", headers={"ndif-api-key": token})
    assert reply.status_code == 401, reply.text
    return reply.json()["detail"]


def _whoami(client: TestClient, token: str) -> dict:
    return client.get("/whoami", headers={"ndif-api-key": token}).json()


def test_rotation_reaches_jwks_and_verifier_without_restart(tmp_path, idp):
    clock = FakeClock()
    client = TestClient(build_app(_settings(tmp_path, idp), clock=clock))
    cli = KeyStore(tmp_path / "keys", clock)
    old_kid = cli.signing_key()[0]
    old_token = TokenIssuer(cli, clock=clock).issue("alice", Role.RESEARCHER, 30 * 86400)
    assert [k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]] == [old_kid]

    new_kid = cli.rotate(grace_s=DAY)
    new_token = TokenIssuer(cli, clock=clock).issue("bob", Role.RESEARCHER, 30 * 86400)

    kids = {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}
    assert kids == {old_kid, new_kid}
    assert _whoami(client, old_token)["email"] == "alice"  # grace
    assert _whoami(client, new_token)["email"] == "bob"

    clock.advance(DAY)
    kids = [k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]]
    assert kids == [new_kid]
    assert _whoami(client, old_token)["email"] is None
    assert "retired" in _refusal(client, old_token)
    assert _whoami(client, new_token)["email"] == "bob"


def test_external_issuer_token_is_accepted_and_a_stranger_is_not(tmp_path, idp):
    client = TestClient(build_app(_settings(tmp_path, idp)))
    kid = idp.add_key("ES256")
    token = idp.token(kid, groups=["proj-x"])
    assert _whoami(client, token) == {
        "email": "uni:alice@uni-example.eu",
        "tags": ["researcher", "uni-example", "proj-x"],
    }
    with FakeIdP(issuer="https://evil.example") as stranger:
        foreign = stranger.token(stranger.add_key("ES256"))
        assert "does not trust" in _refusal(client, foreign)
    rs_kid = idp.add_key("RS256")  # published, but RS256 is not configured for this issuer
    assert "not accepted" in _refusal(client, idp.token(rs_kid))
