"""Authentication for eDIF: who is calling, in which role, proven by a signed token.

Flow: an admin runs `edif token issue`, which signs a JWT (EdDSA, Ed25519) with the active key
of the `KeyStore` under `$EDIF_HOME/keys`; researchers pass it to nnsight as their API key. The
broker and site agents verify it with a `TokenVerifier` over the same public keys (the KeyStore,
or its JWKS via `public_keys_from_jwks`) and get back `Claims`. `Pseudonymizer` turns the
claimed user id into the stable pseudonym that logs and metrics carry instead.

Keys rotate (`edif key rotate|list|retire`): `auth.rotation` decides, from the records in
`keys.json` and the clock, which kid signs and which kids still verify. The broker also trusts
institutions' OIDC providers (`auth.external`: `IssuerRouter` picks the verifier by `iss`;
`ExternalVerifier` checks against the provider's JWKS, cached by `auth.remote_jwks`).
"""

from auth.keys import KeyStore, kid_of, public_keys_from_jwks
from auth.pseudonym import Pseudonymizer
from auth.roles import Role
from auth.tokens import (
    BROKER_AUDIENCE,
    DEFAULT_ISSUER,
    NO_TOKEN,
    Claims,
    TokenIssuer,
    TokenVerifier,
)

__all__ = [
    "BROKER_AUDIENCE",
    "DEFAULT_ISSUER",
    "NO_TOKEN",
    "Claims",
    "KeyStore",
    "Pseudonymizer",
    "Role",
    "TokenIssuer",
    "TokenVerifier",
    "kid_of",
    "public_keys_from_jwks",
]
