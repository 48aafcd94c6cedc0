"""Rejoining without a join token: the stored site credential (0600), its renewal, the choice."""

from __future__ import annotations

import stat

import pytest

from broker.joins import CatalogInfo, JoinReply, JoinRequest
from edif.clock import FakeClock
from edif.errors import AuthenticationError, ConfigError
from site_agent.broker_link import CredentialKeeper
from site_agent.credential_store import CredentialFile, StoredCredential
from site_agent.join import join_or_rejoin
from site_agent.service_unit import render_unit

URL = "http://127.0.0.1:8000"
REQUEST = JoinRequest(site="fau", address="127.0.0.1:50051")


def reply(credential: str = "cred-1", ttl: int = 3600) -> JoinReply:
    return JoinReply(
        site="fau",
        issuer="edif",
        jwks={"keys": []},
        credential=credential,
        credential_audience="edif-broker-sites",
        credential_expires_in_s=ttl,
        catalog=CatalogInfo(kind="embedded"),
        heartbeat_ttl_s=15,
        deregister_after_s=120,
    )


class FakeBroker:
    """The broker as `join_or_rejoin` and `CredentialKeeper` see it."""

    def __init__(self, valid_tokens: set[str]) -> None:
        self.url = URL
        self.valid = valid_tokens
        self.calls: list[tuple[str, str]] = []
        self.renewals = 0

    async def join(self, join_token: str, request: JoinRequest) -> JoinReply:
        self.calls.append(("join", join_token))
        if join_token not in self.valid:
            raise AuthenticationError(f"broker at {URL} answered 401: token has expired")
        return reply("cred-from-token")

    async def rejoin(self, credential: str, request: JoinRequest) -> JoinReply:
        self.calls.append(("rejoin", credential))
        if credential not in self.valid:
            raise AuthenticationError(f"broker at {URL} answered 401: token has expired")
        return reply("cred-from-rejoin")

    async def post(self, path: str, token: str, body=None):
        assert path == "/sites/fau/credential" and token in self.valid
        self.renewals += 1
        fresh = f"cred-renewed-{self.renewals}"
        self.valid.add(fresh)
        return _Json({"credential": fresh, "credential_expires_in_s": 3600})


class _Json:
    def __init__(self, body: dict) -> None:
        self._body = body

    def json(self) -> dict:
        return self._body


def stored(credential: str, clock: FakeClock, left_s: float) -> StoredCredential:
    now = clock.now()
    return StoredCredential(URL, "fau", credential, now - 3600 + left_s, now + left_s)


def test_file_is_private_and_round_trips(tmp_path) -> None:
    file = CredentialFile(tmp_path / "state")
    assert file.load() is None
    saved = stored("secret-cred", FakeClock(), 600)
    file.save(saved)
    assert stat.S_IMODE(file.path.stat().st_mode) == 0o600
    assert file.load() == saved
    assert "secret-cred" not in repr(saved)


def test_usable_and_renewal_policy() -> None:
    clock = FakeClock()
    cred = StoredCredential(URL, "fau", "c", clock.now(), clock.now() + 3600)
    assert cred.usable(URL, "fau", clock.now()) and not cred.renew_due(clock.now())
    assert not cred.usable("http://other:8000", "fau", clock.now())
    assert not cred.usable(URL, "ansbach", clock.now())
    assert cred.renew_due(clock.now() + 1800)  # half the lifetime
    assert not cred.usable(URL, "fau", clock.now() + 3590)  # within the expiry slack


async def test_restart_rejoins_with_the_stored_credential_not_the_expired_token(tmp_path) -> None:
    clock = FakeClock()
    file = CredentialFile(tmp_path)
    file.save(stored("cred-0", clock, 600))
    broker = FakeBroker({"cred-0"})
    got = await join_or_rejoin(broker, REQUEST, "expired-join-token", file, clock)
    assert got.credential == "cred-from-rejoin"
    assert broker.calls == [("rejoin", "cred-0")]  # the join token was not even needed


async def test_refused_credential_falls_back_to_the_join_token(tmp_path) -> None:
    clock = FakeClock()
    file = CredentialFile(tmp_path)
    file.save(stored("revoked", clock, 600))
    broker = FakeBroker({"fresh-token"})
    got = await join_or_rejoin(broker, REQUEST, "fresh-token", file, clock)
    assert got.credential == "cred-from-token"
    assert broker.calls == [("rejoin", "revoked"), ("join", "fresh-token")]


async def test_both_expired_says_so_and_how_to_fix_it(tmp_path) -> None:
    clock = FakeClock()
    file = CredentialFile(tmp_path)
    file.save(stored("old", clock, -10))  # expired ten seconds ago
    broker = FakeBroker(set())
    with pytest.raises(ConfigError) as caught:
        await join_or_rejoin(broker, REQUEST, "expired-join-token", file, clock)
    message = caught.value.message
    assert "the join token was refused" in message and "token has expired" in message
    assert "the stored one expired at" in message
    assert "edif token issue --role site --site fau" in message
    assert "expired-join-token" not in message
    assert broker.calls == [("join", "expired-join-token")]  # an expired credential is not sent
    with pytest.raises(ConfigError, match="no join token was given, and no usable"):
        await join_or_rejoin(broker, REQUEST, None, CredentialFile(tmp_path / "none"), clock)


async def test_keeper_stores_and_renews_at_half_life(tmp_path) -> None:
    clock = FakeClock()
    file = CredentialFile(tmp_path)
    broker = FakeBroker({"cred-a"})
    keeper = CredentialKeeper(broker, file, reply("cred-a", ttl=3600), clock)
    assert file.load().credential == "cred-a" and keeper.token == "cred-a"
    await keeper.renew_if_due()
    assert broker.renewals == 0
    clock.advance(1800)
    await keeper.renew_if_due()
    assert keeper.token == "cred-renewed-1" == file.load().credential
    assert file.load().expires_at == clock.now() + 3600


def test_service_unit_keeps_the_credential_in_a_private_state_directory(tmp_path) -> None:
    unit = render_unit("fau", tmp_path / "fau.yaml", tmp_path / "agent.env")
    assert "StateDirectory=edif-agent-fau" in unit and "StateDirectoryMode=0700" in unit
    assert "Environment=EDIF_AGENT_STATE_DIR=/var/lib/edif-agent-fau" in unit
