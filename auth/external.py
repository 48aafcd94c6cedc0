"""External issuers: an institution's OIDC provider, trusted by JWKS URL and a claim mapping.

The broker config lists each trusted provider (`ExternalIssuer`): its `iss`, the URL of its
JWKS, the audience its tokens must carry for us, the algorithms we accept from it (RS256,
ES256, EdDSA; never HMAC, never `none`) and how its claims map onto our `Claims`: which claim
is the subject, which holds the role(s) and groups, how its role values translate to ours, the
role for users it names none for, and which of our roles it may grant at all (never the
internal `site`/`broker` identities).

Flow of `ExternalVerifier.verify` (the `IssuerRouter` chose it by the token's unverified `iss`):
the header's alg must be one configured for this issuer (it is only checked, never trusted: the
key must be of that algorithm too) → the key by kid from the cached JWKS (`RemoteJwks`,
refetched on an unknown kid at a bounded rate) → signature and `exp` presence (PyJWT, the one
algorithm) → iss, aud → claim mapping → exp/nbf/iat against our clock → revocation by jti.
The subject becomes `<name>:<sub>`, so a provider can never speak for a local user or for
another provider's users. Every failure is an AuthenticationError that never quotes the token.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from auth.remote_jwks import Fetch, RemoteJwks
from auth.roles import Role
from auth.tokens import Claims, check_times, show
from edif.clock import Clock, SystemClock
from edif.errors import AuthenticationError

Algorithm = Literal["RS256", "ES256", "EdDSA"]
ACCEPTED_ALGORITHMS: frozenset[str] = frozenset({"RS256", "ES256", "EdDSA"})
# Identities only eDIF itself may grant: a provider minting them could impersonate the mesh.
INTERNAL_ROLES: frozenset[Role] = frozenset({Role.SITE, Role.BROKER})


class ClaimMapping(BaseModel):
    """Which of the provider's claims carry what we need."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sub: str = "sub"  # e.g. "email" or "preferred_username"
    role: str | None = None  # a string or a list of strings; None: everyone gets default_role
    groups: str | None = "groups"  # a string or a list of strings
    # Provider role values → ours (e.g. {"ndif-staff": "governance"}); values not listed are
    # accepted if they are one of our role names.
    role_values: dict[str, Role] = Field(default_factory=dict)


class ExternalIssuer(BaseModel):
    """One trusted OIDC provider (an entry of the broker's `external_issuers`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,40}$")  # subjects become "<name>:<sub>"
    issuer: str = Field(min_length=1)
    jwks_url: str
    audience: str = Field(min_length=1)
    algorithms: list[Algorithm] = Field(default_factory=lambda: ["RS256"], min_length=1)
    claims: ClaimMapping = Field(default_factory=ClaimMapping)
    default_role: Role | None = Role.RESEARCHER  # None: a token without a role is refused
    allowed_roles: list[Role] = Field(default_factory=lambda: [Role.RESEARCHER])
    groups: list[str] = Field(default_factory=list)  # added to every user (e.g. the institution)
    leeway_s: float = Field(default=30.0, ge=0)
    jwks_min_refetch_s: float = Field(default=60.0, ge=0)
    jwks_max_age_s: float = Field(default=3600.0, gt=0)

    @field_validator("jwks_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("jwks_url must be an http(s) URL")
        return value

    @model_validator(mode="after")
    def _roles_are_grantable(self) -> ExternalIssuer:
        internal = INTERNAL_ROLES & {*self.allowed_roles, *self.claims.role_values.values()}
        if internal:
            raise ValueError(f"an external issuer may not grant {sorted(internal)}")
        if self.default_role is not None and self.default_role not in self.allowed_roles:
            raise ValueError("default_role must be one of allowed_roles")
        return self


def parse_jwks(document: dict[str, Any]) -> dict[str, jwt.PyJWK]:
    """The signing keys of a provider's JWKS by kid; keys we cannot use are skipped.

    Providers publish encryption keys and algorithms we do not take beside their signing
    keys; one odd entry must not make every token unverifiable. A key without a kid is kept
    under "" (used only when the token names no kid either).
    """
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise ValueError('JWKS must be a JSON object with a "keys" list')
    keys = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        if jwk.algorithm_name in ACCEPTED_ALGORITHMS:
            keys[str(entry.get("kid") or "")] = jwk
    return keys


class ExternalVerifier:
    """Verifies tokens of one external issuer and maps them to our `Claims`."""

    def __init__(
        self,
        config: ExternalIssuer,
        clock: Clock | None = None,
        revoked: Callable[[str], bool] | None = None,
        fetch: Fetch | None = None,
    ) -> None:
        self.config = config
        self._clock = clock or SystemClock()
        self._revoked = revoked
        self.jwks = RemoteJwks(
            config.jwks_url,
            parse_jwks,
            self._clock,
            fetch,
            min_refetch_s=config.jwks_min_refetch_s,
            max_age_s=config.jwks_max_age_s,
        )

    def verify(self, token: str) -> Claims:
        cfg = self.config
        header = _header(token)
        alg = header.get("alg")
        if alg not in cfg.algorithms:
            raise AuthenticationError(
                f"token algorithm {show(alg)} is not accepted for issuer {cfg.issuer!r} "
                f"(accepted: {', '.join(cfg.algorithms)})"
            )
        kid = str(header.get("kid") or "")
        jwk = self.jwks.key_for(kid)
        if jwk is None:
            raise AuthenticationError(
                f"token was signed by key {show(kid)}, which is not in the key set of issuer "
                f"{cfg.issuer!r}; sign in again to get a fresh token"
            )
        if jwk.algorithm_name != alg:
            raise AuthenticationError(
                f"token algorithm {show(alg)} does not match key {show(kid)} of issuer "
                f"{cfg.issuer!r} ({jwk.algorithm_name})"
            )
        payload = _decode(token, jwk, alg)
        if payload.get("iss") != cfg.issuer:
            raise AuthenticationError(f"token issuer is not {cfg.issuer!r}")
        _check_audience(payload.get("aud"), cfg.audience)
        claims = self._map(payload, token)
        check_times(
            claims, self._clock.now(), cfg.leeway_s, f"sign in to {cfg.issuer} again for a new one"
        )
        if self._revoked is not None and self._revoked(claims.jti):
            raise AuthenticationError(
                "this token has been revoked by the eDIF operators; sign in again for a new one"
            )
        return claims

    def _map(self, payload: dict[str, Any], token: str) -> Claims:
        cfg, mapping = self.config, self.config.claims
        sub = payload.get(mapping.sub)
        if not isinstance(sub, str) or not sub.strip():
            raise AuthenticationError(
                f"token from {cfg.issuer!r} has no usable {mapping.sub!r} claim (the subject)"
            )
        groups = [*cfg.groups, *_strings(payload.get(mapping.groups) if mapping.groups else None)]
        iat = _time_claim(payload, "iat")
        nbf = _time_claim(payload, "nbf")
        exp = _time_claim(payload, "exp")
        if exp is None:
            raise AuthenticationError("token lacks the required claim 'exp'")
        now = int(self._clock.now())
        fields = {
            "sub": f"{cfg.name}:{sub.strip()}",
            "role": self._role(payload),
            "groups": list(dict.fromkeys(groups)),
            "iss": cfg.issuer,
            "aud": cfg.audience,
            "exp": exp,
            "iat": iat if iat is not None else now,
            "nbf": nbf if nbf is not None else iat if iat is not None else now,
            # Revocation is by jti; a provider that sets none gets one derived from the token.
            "jti": str(
                payload.get("jti") or "sha256:" + hashlib.sha256(token.encode()).hexdigest()
            ),
        }
        try:
            return Claims(**fields)
        except ValidationError as exc:
            raise AuthenticationError(f"token from {cfg.issuer!r} has invalid claims") from exc

    def _role(self, payload: dict[str, Any]) -> Role:
        cfg, mapping = self.config, self.config.claims
        values = _strings(payload.get(mapping.role)) if mapping.role else []
        if not values:
            if cfg.default_role is None:
                raise AuthenticationError(
                    f"token from {cfg.issuer!r} carries no role ({mapping.role!r} claim) and this "
                    "broker gives its users none by default"
                )
            return cfg.default_role
        for value in values:  # the first value that maps to a role this issuer may grant
            role = mapping.role_values.get(value) or _our_role(value)
            if role is not None and role in cfg.allowed_roles:
                return role
        allowed = ", ".join(r.value for r in cfg.allowed_roles)
        raise AuthenticationError(
            f"token role {show(values if len(values) > 1 else values[0])} from {cfg.issuer!r} is "
            f"not a role this broker accepts from it ({allowed})"
        )


class IssuerRouter:
    """The broker's `Authenticator`: picks the verifier by the token's (unverified) `iss`.

    Reading `iss` before the signature is checked is safe: it only chooses which keys and
    rules apply; the chosen verifier then checks the signature and `iss` itself.
    """

    def __init__(
        self,
        local: Any,  # auth.tokens.TokenVerifier for our own issuer
        local_issuer: str,
        external: Mapping[str, ExternalVerifier] | None = None,
    ) -> None:
        self._local = local
        self._local_issuer = local_issuer
        self._external = dict(external or {})
        if local_issuer in self._external:
            raise ValueError(f"external issuer {local_issuer!r} is this broker's own issuer")

    @classmethod
    def build(
        cls,
        local: Any,
        local_issuer: str,
        configs: list[ExternalIssuer],
        clock: Clock | None = None,
        revoked: Callable[[str], bool] | None = None,
    ) -> IssuerRouter:
        verifiers = {cfg.issuer: ExternalVerifier(cfg, clock, revoked) for cfg in configs}
        return cls(local, local_issuer, verifiers)

    def verify(self, token: str | None) -> Claims:
        if token is None or not token.strip() or not self._external:
            return self._local.verify(token)
        token = token.strip()
        iss = _unverified_issuer(token)
        if iss is None or iss == self._local_issuer:
            return self._local.verify(token)
        verifier = self._external.get(iss)
        if verifier is None:
            trusted = ", ".join(repr(i) for i in [self._local_issuer, *self._external])
            raise AuthenticationError(
                f"token was issued by {show(iss)}, which this broker does not trust "
                f"(trusted issuers: {trusted})"
            )
        return verifier.verify(token)


def _unverified_issuer(token: str) -> str | None:
    try:
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except (jwt.PyJWTError, ValueError, TypeError, AttributeError):
        return None  # the local verifier says what is malformed
    return iss if isinstance(iss, str) else None


def _header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise AuthenticationError(
            "API key is not a valid JWT; check that it was copied whole"
        ) from exc


def _decode(token: str, jwk: jwt.PyJWK, alg: str) -> dict[str, Any]:
    options = {
        "require": ["exp", "iss"],
        "verify_signature": True,
        "verify_exp": False,  # checked with our clock and message (check_times)
        "verify_nbf": False,
        "verify_iat": False,
        "verify_iss": False,
        "verify_aud": False,
    }
    try:
        return jwt.decode(token, jwk.key, algorithms=[alg], options=options)
    except jwt.InvalidSignatureError as exc:
        raise AuthenticationError(
            "token signature does not verify with its issuer's key: it was altered or forged"
        ) from exc
    except jwt.MissingRequiredClaimError as exc:
        raise AuthenticationError(f"token lacks the required claim {exc.claim!r}") from exc
    except jwt.PyJWTError as exc:
        raise AuthenticationError(f"token is invalid: {show(str(exc), 80)}") from exc


def _check_audience(aud: Any, expected: str) -> None:
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if expected not in audiences:
        raise AuthenticationError(
            f"token is meant for audience {show(aud)}, not {expected!r}: ask your identity "
            "provider for a token for eDIF"
        )


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v]
    return []


def _our_role(value: str) -> Role | None:
    try:
        return Role(value)
    except ValueError:
        return None


def _time_claim(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    # bool is an int to Python; inf and nan are floats no clock reaches
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthenticationError(f"token claim {name!r} is not a number")
    return int(value)
