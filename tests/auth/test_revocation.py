"""Revocation by jti: the verifier refuses a revoked token, on the next call, without restart."""

from __future__ import annotations

import pytest

from auth.keys import KeyStore
from auth.revocation import RevocationList
from auth.roles import Role
from auth.tokens import TokenIssuer, TokenVerifier
from edif.clock import FakeClock
from edif.errors import AuthenticationError


@pytest.fixture
def store(tmp_path) -> KeyStore:
    return KeyStore(tmp_path / "keys")


def test_revoked_token_is_refused_and_others_still_pass(store) -> None:
    clock = FakeClock()
    issuer = TokenIssuer(store, clock=clock)
    revoked, kept = (
        issuer.issue("alice", Role.RESEARCHER, 3600),
        issuer.issue("bob", Role.RESEARCHER, 3600),
    )
    verifier_list = RevocationList(store.directory, clock)
    verifier = TokenVerifier(store, clock=clock, revoked=verifier_list.is_revoked)
    claims = verifier.verify(revoked)
    assert verifier.verify(kept).sub == "bob"
    # Another process (the CLI) writes the list; the verifier's list sees it on the next call.
    RevocationList(store.directory, clock).revoke(claims.jti, claims.exp)
    with pytest.raises(AuthenticationError, match="revoked") as info:
        verifier.verify(revoked)
    assert revoked not in info.value.message
    assert verifier.verify(kept).sub == "bob"


def test_expired_entries_are_pruned_on_the_next_revocation(store) -> None:
    clock = FakeClock()
    revocations = RevocationList(store.directory, clock)
    revocations.revoke("old", clock.now() + 10)
    clock.advance(60)
    revocations.revoke("new", clock.now() + 10)
    assert set(revocations.entries()) == {"new"}
    assert not revocations.is_revoked("old")
