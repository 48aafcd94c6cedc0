"""External OIDC issuers (auth.external) against a real JWKS served on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fake_oidc import FakeIdP

from auth.external import ExternalIssuer, ExternalVerifier, IssuerRouter
from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer, TokenVerifier
from edif.clock import FakeClock
from edif.errors import AuthenticationError


@pytest.fixture
def idp():
    with FakeIdP() as server:
        yield server


@pytest.fixture
def clock():
    return FakeClock(start=1_800_000_000.0)


def _config(idp: FakeIdP, **overrides) -> ExternalIssuer:
    fields = {
        "name": "uni",
        "issuer": idp.issuer,
        "jwks_url": idp.jwks_url,
        "audience": "edif",
        "algorithms": ["RS256", "ES256", "EdDSA"],
        "claims": {
            "sub": "email",
            "role": "edif_roles",
            "groups": "groups",
            "role_values": {"ndif-staff": "governance"},
        },
        "allowed_roles": ["researcher", "governance"],
        "groups": ["uni-example"],
        "jwks_min_refetch_s": 30,
    }
    return ExternalIssuer.model_validate({**fields, **overrides})


def _verifier(idp, clock, **overrides) -> ExternalVerifier:
    return ExternalVerifier(_config(idp, **overrides), clock)


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _refused(verifier, token: str, fragment: str) -> str:
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token)
    assert fragment in info.value.message, info.value.message
    assert not token or token not in info.value.message
    return info.value.message


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_each_algorithm_verifies_and_maps_claims(idp, clock, alg):
    kid = idp.add_key(alg)
    token = idp.token(kid, now=clock.now(), groups=["proj-x"], edif_roles=["ndif-staff"])
    claims = _verifier(idp, clock).verify(token)

    assert claims.sub == "uni:alice@uni-example.eu"
    assert claims.role is Role.GOVERNANCE
    assert claims.groups == ["uni-example", "proj-x"]
    assert claims.iss == idp.issuer
    assert claims.jti.startswith("sha256:")  # the provider set none; revocation still works


def test_default_role_when_the_token_names_none(idp, clock):
    kid = idp.add_key("RS256")
    claims = _verifier(idp, clock).verify(idp.token(kid, now=clock.now(), jti="abc"))
    assert claims.role is Role.RESEARCHER
    assert claims.jti == "abc"


def test_roles_must_be_ours_and_grantable_by_this_issuer(idp, clock):
    kid = idp.add_key("RS256")
    verifier = _verifier(idp, clock)
    _refused(verifier, idp.token(kid, now=clock.now(), edif_roles="superuser"), "not a role")
    # admin is one of our roles, but this issuer may not grant it
    _refused(verifier, idp.token(kid, now=clock.now(), edif_roles=["admin"]), "not a role")
    # the first value that maps wins; unknown ones are skipped
    token = idp.token(kid, now=clock.now(), edif_roles=["offline_access", "researcher"])
    assert verifier.verify(token).role is Role.RESEARCHER
    no_default = _verifier(idp, clock, default_role=None)
    _refused(no_default, idp.token(kid, now=clock.now()), "carries no role")


def test_internal_roles_cannot_be_configured():
    with pytest.raises(ValueError, match="may not grant"):
        ExternalIssuer(
            name="x",
            issuer="i",
            jwks_url="http://127.0.0.1/j",
            audience="a",
            allowed_roles=["site"],
        )
    with pytest.raises(ValueError, match="jwks_url"):
        ExternalIssuer(name="x", issuer="i", jwks_url="file:///etc/passwd", audience="a")


def test_algorithm_is_never_taken_from_the_token(idp, clock):
    rsa_kid = idp.add_key("RS256")
    only_es = _verifier(idp, clock, algorithms=["ES256"])
    _refused(only_es, idp.token(rsa_kid, now=clock.now()), "not accepted")

    # HS256 keyed with the RSA public key (the classic confusion), signed by hand
    pem = (
        idp.keys[rsa_kid][0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    body = {"iss": idp.issuer, "aud": "edif", "exp": int(clock.now()) + 60, "email": "m"}
    signing_input = f"{_b64({'alg': 'HS256', 'kid': rsa_kid})}.{_b64(body)}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    hs = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    verifier = _verifier(idp, clock)
    _refused(verifier, hs, "not accepted")
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": rsa_kid}).encode())
    unsigned = header.rstrip(b"=").decode() + "." + idp.token(rsa_kid).split(".")[1] + "."
    _refused(verifier, unsigned, "not accepted")


def test_alg_must_match_the_key(idp, clock):
    es_kid = idp.add_key("ES256")
    rsa_kid = idp.add_key("RS256")
    # signed by the RSA key but claiming the EC key's kid and alg RS256
    token = idp.token(rsa_kid, now=clock.now())
    head, payload, sig = token.split(".")
    forged_head = json.loads(base64.urlsafe_b64decode(head + "=="))
    forged_head["kid"] = es_kid
    enc = base64.urlsafe_b64encode(json.dumps(forged_head).encode()).rstrip(b"=").decode()
    _refused(_verifier(idp, clock), f"{enc}.{payload}.{sig}", "does not match key")


def test_times_and_audience_are_checked(idp, clock):
    kid = idp.add_key("ES256")
    verifier = _verifier(idp, clock)
    _refused(verifier, idp.token(kid, now=clock.now() - 3600, ttl_s=60), "expired")
    _refused(verifier, idp.token(kid, now=clock.now(), nbf=int(clock.now()) + 600), "not valid")
    _refused(verifier, idp.token(kid, now=clock.now(), audience="other-app"), "audience")
    _refused(verifier, idp.token(kid, now=clock.now(), email=None), "'email'")
    _refused(verifier, idp.token(kid, now=clock.now(), exp=None), "'exp'")


def test_a_tampered_token_is_refused(idp, clock):
    kid = idp.add_key("RS256")
    head, payload, sig = idp.token(kid, now=clock.now()).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["email"] = "admin@uni-example.eu"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    _refused(_verifier(idp, clock), f"{head}.{forged}.{sig}", "signature")


def test_unknown_kid_refetches_at_a_bounded_rate(idp, clock):
    first = idp.add_key("RS256")
    verifier = _verifier(idp, clock)
    verifier.verify(idp.token(first, now=clock.now()))
    verifier.verify(idp.token(first, now=clock.now()))
    assert idp.hits == 1  # cached

    rotated = idp.add_key("ES256")  # the provider rotates
    clock.advance(31)
    assert verifier.verify(idp.token(rotated, now=clock.now())).sub.startswith("uni:")
    assert idp.hits == 2

    unpublished = idp.add_key("RS256", publish=False)  # made-up kids must not flood the IdP
    for _ in range(5):
        _refused(verifier, idp.token(unpublished, now=clock.now()), "not in the key set")
    assert idp.hits == 2  # fetched 0 s ago: the rate limit holds
    clock.advance(31)
    for _ in range(5):
        _refused(verifier, idp.token(unpublished, now=clock.now()), "not in the key set")
    assert idp.hits == 3  # one refetch per interval, however many tokens


def test_withdrawn_key_stops_verifying_after_max_age(idp, clock):
    old = idp.add_key("RS256")
    verifier = _verifier(idp, clock, jwks_max_age_s=300)
    verifier.verify(idp.token(old, now=clock.now()))
    idp.published.remove(old)
    idp.add_key("RS256")
    clock.advance(301)
    _refused(verifier, idp.token(old, now=clock.now()), "not in the key set")


def test_unreachable_jwks_is_a_401_not_a_crash(clock):
    cfg = ExternalIssuer(
        name="down", issuer="https://down", jwks_url="http://127.0.0.1:9/jwks", audience="edif"
    )
    # a well-formed RS256 token whose issuer's key set cannot be fetched (nothing listens)
    token = jwt.encode({"iss": "https://down"}, _rsa_key(), algorithm="RS256", headers={"kid": "k"})
    with pytest.raises(AuthenticationError, match="could not be fetched"):
        ExternalVerifier(cfg, clock).verify(token)


def _rsa_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(65537, 2048)


def test_revoked_external_token_is_refused(idp, clock):
    kid = idp.add_key("RS256")
    token = idp.token(kid, now=clock.now(), jti="leaked")
    verifier = ExternalVerifier(_config(idp), clock, revoked=lambda jti: jti == "leaked")
    _refused(verifier, token, "revoked")


def test_router_picks_the_verifier_by_issuer(idp, clock, tmp_path):
    store = KeyStore(tmp_path / "keys", clock)
    local = TokenVerifier(store, clock=clock)
    router = IssuerRouter.build(local, "edif", [_config(idp)], clock)
    ours = TokenIssuer(store, clock=clock).issue("bob", Role.ADMIN, 600)
    assert router.verify(ours).sub == "bob"

    kid = idp.add_key("EdDSA")
    assert router.verify(idp.token(kid, now=clock.now())).sub == "uni:alice@uni-example.eu"

    stranger = FakeIdP(issuer="https://evil.example")
    stranger.add_key("RS256")
    foreign = stranger.token(next(iter(stranger.keys)), now=clock.now())
    message = _refused(router, foreign, "does not trust")
    assert "'edif'" in message and idp.issuer in message
    _refused(router, "", "no API key")
    _refused(router, "not-a-jwt", "not a valid eDIF token")


def test_router_refuses_an_external_issuer_named_like_ours(idp, clock, tmp_path):
    local = TokenVerifier(KeyStore(tmp_path), clock=clock)
    with pytest.raises(ValueError, match="own issuer"):
        IssuerRouter.build(local, "edif", [_config(idp, issuer="edif")], clock)
