"""Bearer tokens: EdDSA-signed JWTs that say who a caller is and in which role.

`TokenIssuer` signs with the KeyStore's active key (`edif token issue` is its front end). The
broker and the site agents hold a `TokenVerifier` over the same public keys (a KeyStore, a
mapping, or a callable such as one that reads the broker's JWKS).

Verification runs in this order, and each failure is an AuthenticationError with its own
message: a token at all; a header that parses and says alg EdDSA (the algorithm is never taken
from the token, so `none` and HS256-keyed-with-the-public-key never reach a key); a kid this
service knows; the signature and the presence of the required claims (PyJWT, EdDSA only);
issuer and audience; the claim types and role (`Claims`); then exp/nbf/iat against the injected
clock with leeway, because PyJWT would compare against the real time. Messages never quote the
token: it is a credential, and error text ends up in logs and in client tracebacks.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from auth.keys import KeyStore
from auth.roles import Role
from edif.clock import Clock, SystemClock
from edif.errors import AuthenticationError, BadRequest

DEFAULT_ISSUER = "edif"
BROKER_AUDIENCE = "edif-broker"
ALGORITHM = "EdDSA"
REQUIRED_CLAIMS = ("exp", "nbf", "iat", "iss", "aud", "sub")

NO_TOKEN = (
    "no API key: set NDIF_API_KEY or nnsight.CONFIG.API.APIKEY to a token issued by "
    "`edif token issue`"
)

_MALFORMED = (
    "API key is not a valid eDIF token (expected a JWT from `edif token issue`); "
    "check that it was copied whole"
)

# Signature and required claims are PyJWT's job; TokenVerifier checks iss, aud and times with our
# messages and our clock (PyJWT compares against the real time).
_DECODE_OPTIONS: dict[str, Any] = {
    "require": list(REQUIRED_CLAIMS),
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_iss": False,
    "verify_aud": False,
}


@runtime_checkable
class KeyResolver(Protocol):
    """Finds a key by kid itself, e.g. refetching a remote JWKS on an unknown kid."""

    def key_for(self, kid: str) -> Any | None: ...


KeySource = (
    KeyStore
    | KeyResolver
    | Mapping[str, Ed25519PublicKey]
    | Callable[[], Mapping[str, Ed25519PublicKey]]
)


class Claims(BaseModel):
    """The verified content of a token."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    sub: str = Field(min_length=1)
    role: Role
    groups: list[str] = Field(default_factory=list)
    site: str | None = None
    iss: str
    aud: str | list[str]
    exp: int
    nbf: int
    iat: int
    jti: str

    @model_validator(mode="after")
    def _site_role_names_its_site(self) -> Claims:
        if self.role is Role.SITE and not self.site:
            raise ValueError("a token with role 'site' must name its site")
        return self


class TokenIssuer:
    """Signs tokens with the KeyStore's active key."""

    def __init__(
        self, keystore: KeyStore, issuer: str = DEFAULT_ISSUER, clock: Clock | None = None
    ) -> None:
        self._keystore = keystore
        self._issuer = issuer
        self._clock = clock or SystemClock()

    def issue(
        self,
        sub: str,
        role: Role | str,
        ttl_s: int,
        audience: str = BROKER_AUDIENCE,
        groups: Iterable[str] = (),
        site: str | None = None,
    ) -> str:
        """A signed token for `sub` in `role`, valid from now for `ttl_s` seconds."""
        if ttl_s < 1:
            raise BadRequest(f"token lifetime must be at least 1 second, got {ttl_s}")
        now = int(self._clock.now())
        claims = _claims_for_issue(
            sub=sub,
            role=role,
            groups=list(groups),
            site=site,
            iss=self._issuer,
            aud=audience,
            iat=now,
            nbf=now,
            exp=now + int(ttl_s),
            jti=secrets.token_urlsafe(16),
        )
        kid, key = self._keystore.signing_key()
        payload = claims.model_dump(mode="json", exclude_none=True)
        return jwt.encode(payload, key, algorithm=ALGORITHM, headers={"kid": kid})


class TokenVerifier:
    """Checks tokens against known public keys; every failure is an AuthenticationError."""

    def __init__(
        self,
        keys: KeySource,
        issuer: str = DEFAULT_ISSUER,
        audience: str = BROKER_AUDIENCE,
        clock: Clock | None = None,
        leeway_s: float = 30,
        revoked: Callable[[str], bool] | None = None,
    ) -> None:
        self._keys = _key_lookup(keys)
        self._store = keys if isinstance(keys, KeyStore) else None
        self._issuer = issuer
        self._audience = audience
        self._clock = clock or SystemClock()
        self._leeway = leeway_s
        self._revoked = revoked

    def verify(self, token: str | None) -> Claims:
        """The token's claims, or AuthenticationError saying what is wrong and what to do."""
        if token is None or not token.strip():
            raise AuthenticationError(NO_TOKEN)
        token = token.strip()
        kid = self._checked_kid(token)
        payload = self._decode(token, kid)
        self._check_issuer_and_audience(payload)
        claims = _parse_claims(payload)
        self._check_times(claims)
        if self._revoked is not None and self._revoked(claims.jti):
            raise AuthenticationError(
                "this token has been revoked by the eDIF operators; ask them for a new one "
                "(`edif token issue`)"
            )
        return claims

    def _checked_kid(self, token: str) -> str:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise AuthenticationError(_MALFORMED) from exc
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise AuthenticationError(
                f"token algorithm {show(alg)} is not accepted: eDIF only accepts EdDSA "
                "(Ed25519) tokens issued by `edif token issue`"
            )
        kid = header.get("kid")
        if not kid:
            raise AuthenticationError(
                "token header has no key id (kid); tokens from `edif token issue` always do"
            )
        return kid

    def _decode(self, token: str, kid: str) -> dict[str, Any]:
        key = self._keys(kid)
        if key is None:
            self._refuse_retired(kid)
            raise AuthenticationError(
                f"token was signed by key {show(kid)}, which this service does not know: it "
                "comes from another eDIF deployment or a retired key; get a new token from "
                "this deployment's `edif token issue`"
            )
        try:
            return jwt.decode(token, key, algorithms=[ALGORITHM], options=_DECODE_OPTIONS)
        except jwt.InvalidSignatureError as exc:
            raise AuthenticationError(
                f"token signature does not verify with key {show(kid)}: the token was altered "
                "or signed by a different key; get a new token from `edif token issue`"
            ) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"token lacks the required claim {exc.claim!r}") from exc
        except jwt.DecodeError as exc:
            raise AuthenticationError(_MALFORMED) from exc
        except jwt.PyJWTError as exc:
            # PyJWT's messages name the rule broken ("Subject must be a string"), not values.
            raise AuthenticationError(f"token is invalid: {show(str(exc), 80)}") from exc

    def _refuse_retired(self, kid: str) -> None:
        """A clearer refusal for a kid this store rotated out (its record says when)."""
        record = self._store.records().get(kid) if self._store is not None else None
        if record is None or record.retire_at is None or record.retire_at > self._clock.now():
            return
        raise AuthenticationError(
            f"token was signed by key {show(kid)}, which was retired at "
            f"{_utc(record.retire_at)} after a key rotation (its grace period is over); "
            "get a new token from `edif token issue`"
        )

    def _check_issuer_and_audience(self, payload: dict[str, Any]) -> None:
        if payload["iss"] != self._issuer:
            raise AuthenticationError(
                f"token was issued by {show(payload['iss'])}, but this service accepts only "
                f"tokens issued by {self._issuer!r}"
            )
        aud = payload["aud"]
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self._audience not in audiences:
            raise AuthenticationError(
                f"token is meant for audience {show(aud)}, not {self._audience!r}; issue one "
                f"with `edif token issue --audience {self._audience}`"
            )

    def _check_times(self, claims: Claims) -> None:
        check_times(
            claims, self._clock.now(), self._leeway, "get a new one with `edif token issue`"
        )


def check_times(claims: Claims, now: float, leeway_s: float, renew_hint: str) -> None:
    """exp, nbf and iat against `now` (with leeway); AuthenticationError saying which failed."""
    if claims.exp <= now - leeway_s:
        raise AuthenticationError(
            f"token expired at {_utc(claims.exp)} ({_span(now - claims.exp)} ago); {renew_hint}"
        )
    if claims.nbf > now + leeway_s:
        raise AuthenticationError(
            f"token is not valid before {_utc(claims.nbf)} (in {_span(claims.nbf - now)}); "
            "if that looks wrong, check the clocks of this machine and the issuer's"
        )
    if claims.iat > now + leeway_s:
        raise AuthenticationError(
            f"token claims to be issued in the future ({_utc(claims.iat)}); "
            "check the clocks of this machine and the issuer's"
        )


def _key_lookup(keys: KeySource) -> Callable[[str], Ed25519PublicKey | None]:
    """kid -> key. A KeyStore is asked on every call, so rotations apply at once."""
    if isinstance(keys, KeyStore):
        return lambda kid: keys.public_keys().get(kid)
    if isinstance(keys, KeyResolver):
        return keys.key_for
    if isinstance(keys, Mapping):
        return keys.get
    if callable(keys):
        return lambda kid: keys().get(kid)
    raise TypeError("keys must be a KeyStore, KeyResolver, mapping of kid to key, or callable")


def _claims_for_issue(**fields: Any) -> Claims:
    try:
        return Claims(**fields)
    except ValidationError as exc:
        raise BadRequest(f"cannot issue token: {_describe(exc)}") from exc


def _parse_claims(payload: dict[str, Any]) -> Claims:
    try:
        return Claims.model_validate(payload)
    except ValidationError as exc:
        if any(err["loc"][:1] == ("role",) for err in exc.errors()):
            roles = ", ".join(role.value for role in Role)
            raise AuthenticationError(
                f"token role {show(payload.get('role'))} is not a known role ({roles})"
            ) from exc
        raise AuthenticationError(f"token claims are invalid: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    """Which fields failed and why, without echoing the values (pydantic's str() would)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def show(value: Any, limit: int = 40) -> str:
    """A token-supplied value, quoted and cut short: headers and claims are attacker text."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _utc(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{ts} (epoch seconds)"


def _span(seconds: float) -> str:
    """A rough duration ("2d 3h", "5m 10s"): enough to see how far off a time is."""
    s = int(abs(seconds))
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {s % 60}s" if minutes else f"{s}s"
