"""TokenIssuer/TokenVerifier: round trip, time checks on a fake clock, and every refusal."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from auth.keys import KeyStore, public_keys_from_jwks
from auth.roles import Role
from auth.tokens import NO_TOKEN, Claims, TokenIssuer, TokenVerifier
from edif.clock import FakeClock
from edif.errors import AuthenticationError, BadRequest


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path) -> KeyStore:
    return KeyStore(tmp_path / "keys")


@pytest.fixture
def issuer(store, clock) -> TokenIssuer:
    return TokenIssuer(store, clock=clock)


@pytest.fixture
def verifier(store, clock) -> TokenVerifier:
    return TokenVerifier(store, clock=clock)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict) -> str:
    return _b64(json.dumps(obj).encode())


def _refused(verifier: TokenVerifier, token: str | None, match: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError, match=match) as info:
        verifier.verify(token)
    # The message reaches logs and tracebacks: no part of the credential may be in it.
    for part in [token or "", *(token or "").split(".")]:
        assert len(part) < 16 or part not in info.value.message
    return info.value


def test_round_trip(issuer, verifier, clock):
    token = issuer.issue("alice", Role.RESEARCHER, 3600, groups=["lab-a"], site=None)
    claims = verifier.verify(token)

    assert isinstance(claims, Claims)
    assert (claims.sub, claims.role, claims.groups, claims.site) == (
        "alice",
        Role.RESEARCHER,
        ["lab-a"],
        None,
    )
    assert (claims.iss, claims.aud) == ("edif", "edif-broker")
    assert claims.iat == claims.nbf == int(clock.now())
    assert claims.exp == claims.iat + 3600
    assert len(claims.jti) >= 16


def test_header_carries_kid_and_eddsa(issuer, store):
    header = jwt.get_unverified_header(issuer.issue("alice", "researcher", 60))
    assert header["alg"] == "EdDSA"
    assert header["kid"] == store.signing_key()[0]


def test_jti_is_random(issuer, verifier):
    a, b = (verifier.verify(issuer.issue("alice", "admin", 60)).jti for _ in range(2))
    assert a != b


def test_site_token_names_its_site(issuer, verifier):
    claims = verifier.verify(issuer.issue("agent-1", Role.SITE, 60, site="erlangen"))
    assert (claims.role, claims.site) == (Role.SITE, "erlangen")
    with pytest.raises(BadRequest, match="site"):
        issuer.issue("agent-1", Role.SITE, 60)


@pytest.mark.parametrize(("ttl", "role"), [(0, "researcher"), (60, "root")])
def test_issue_refuses_bad_input(issuer, ttl, role):
    with pytest.raises(BadRequest):
        issuer.issue("alice", role, ttl)


def test_keys_from_mapping_callable_and_jwks(issuer, store, clock):
    token = issuer.issue("alice", "researcher", 60)
    keys = public_keys_from_jwks(store.jwks())
    for source in (keys, lambda: keys, store):
        assert TokenVerifier(source, clock=clock).verify(token).sub == "alice"


def test_expired_says_when(issuer, verifier, clock):
    token = issuer.issue("alice", "researcher", 60)
    clock.advance(60 + 29)  # within the 30 s leeway
    verifier.verify(token)
    clock.advance(2)
    error = _refused(verifier, token, "expired at 2027-01-15 08:01:00 UTC")
    assert "edif token issue" in error.message


def test_not_yet_valid(store, verifier, clock):
    future = TokenIssuer(store, clock=FakeClock(clock.now() + 3600))
    _refused(verifier, future.issue("alice", "researcher", 7200), "not valid before")
    clock.advance(3600 - 30)  # leeway lets a slightly fast issuer clock through
    verifier.verify(future.issue("alice", "researcher", 7200))


def test_wrong_issuer(store, verifier, clock):
    token = TokenIssuer(store, issuer="someone-else", clock=clock).issue("alice", "admin", 60)
    _refused(verifier, token, "issued by 'someone-else'.*'edif'")


def test_wrong_audience(issuer, verifier):
    token = issuer.issue("alice", "researcher", 60, audience="edif-site")
    _refused(verifier, token, "audience 'edif-site', not 'edif-broker'")


def test_alg_none_is_refused(issuer, verifier, store):
    kid = store.signing_key()[0]
    payload = jwt.decode(issuer.issue("alice", "admin", 60), options={"verify_signature": False})
    header = {"alg": "none", "typ": "JWT", "kid": kid}
    token = f"{_segment(header)}.{_segment(payload)}."
    _refused(verifier, token, "algorithm 'none' is not accepted")


@pytest.mark.parametrize("encoding", ["raw", "pem"])
def test_hs256_keyed_with_the_public_key_is_refused(issuer, verifier, store, encoding):
    # Classic algorithm confusion: HMAC "signed" with the verifier's own public key bytes.
    kid, key = store.signing_key()
    public = key.public_key()
    secret = (
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if encoding == "raw"
        else public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    payload = jwt.decode(issuer.issue("alice", "admin", 60), options={"verify_signature": False})
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{_segment(payload)}"
    signature = _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())
    _refused(verifier, f"{signing_input}.{signature}", "algorithm 'HS256' is not accepted")


def test_same_kid_from_another_key_is_a_bad_signature(tmp_path, store, verifier, clock):
    other = KeyStore(tmp_path / "other")
    kid, _ = store.signing_key()
    _, other_key = other.signing_key()
    forged = jwt.encode(
        {
            "sub": "mallory",
            "role": "admin",
            "iss": "edif",
            "aud": "edif-broker",
            "iat": int(clock.now()),
            "nbf": int(clock.now()),
            "exp": int(clock.now()) + 60,
            "jti": "x",
        },
        other_key,
        algorithm="EdDSA",
        headers={"kid": kid},
    )
    _refused(verifier, forged, "signature does not verify")


def test_tampered_payload_is_a_bad_signature(issuer, verifier):
    header, payload, signature = issuer.issue("alice", "researcher", 60).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["role"] = "admin"
    _refused(verifier, f"{header}.{_segment(claims)}.{signature}", "signature does not verify")


def test_unknown_kid(tmp_path, verifier, clock):
    token = TokenIssuer(KeyStore(tmp_path / "other"), clock=clock).issue("alice", "admin", 60)
    _refused(verifier, token, "does not know")


def test_missing_kid(store, verifier, clock):
    _, key = store.signing_key()
    token = jwt.encode({"sub": "alice"}, key, algorithm="EdDSA")
    _refused(verifier, token, "no key id")


@pytest.mark.parametrize("garbage", ["garbage", "a.b.c", "eyJhbGciOi.x.y", "Bearer xyz"])
def test_garbage_is_malformed(verifier, garbage):
    _refused(verifier, garbage, "not a valid eDIF token")


@pytest.mark.parametrize("missing", [None, "", "   "])
def test_missing_token(verifier, missing):
    error = _refused(verifier, missing, "no API key")
    assert error.message == NO_TOKEN
    assert "NDIF_API_KEY" in error.message


def _signed(store: KeyStore, payload: dict) -> str:
    kid, key = store.signing_key()
    return jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": kid})


def _payload(clock: FakeClock, **changes) -> dict:
    now = int(clock.now())
    base = {"sub": "alice", "role": "researcher", "iss": "edif", "aud": "edif-broker"}
    return base | {"iat": now, "nbf": now, "exp": now + 60, "jti": "j"} | changes


def test_invalid_role(store, verifier, clock):
    _refused(verifier, _signed(store, _payload(clock, role="root")), "role 'root' is not a known")


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat", "iss", "aud", "sub"])
def test_required_claims(store, verifier, clock, claim):
    payload = _payload(clock)
    del payload[claim]
    _refused(verifier, _signed(store, payload), f"lacks the required claim '{claim}'")


def test_audience_list_is_accepted(store, verifier, clock):
    token = _signed(store, _payload(clock, aud=["edif-site", "edif-broker"]))
    assert verifier.verify(token).sub == "alice"


def test_iat_in_the_future(store, verifier, clock):
    token = _signed(store, _payload(clock, iat=int(clock.now()) + 600))
    _refused(verifier, token, "issued in the future")


def test_site_role_without_site_claim(store, verifier, clock):
    _refused(verifier, _signed(store, _payload(clock, role="site")), "must name its site")


def test_messages_never_contain_the_token(store, issuer, verifier, clock):
    # Every refusal above goes through _refused, which checks this; here the long tail too.
    token = issuer.issue("alice", "researcher", 60)
    clock.advance(10_000)
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token)
    for part in token.split("."):
        assert part not in str(info.value)
