"""Site joins: who may add a site to this broker's routing table, and what a joined site gets.

Role: the broker half of `edif agent join` (federation issue §1). An operator issues a
short-lived join token (`edif token issue --role site --site NAME --ttl 15m`); the agent
presents it once, and gets what it needs to take part: the broker's public keys (JWKS) and
issuer, a longer-lived site credential for heartbeats, and the catalog's rules.

Flow:
1. `join(token, request)`: the token must verify for this broker (audience `edif-broker`),
   carry role `site` (else 403) and name the site it asks to join (else 403); expired or
   foreign tokens are 401. The reply carries a site credential (role `site`, audience
   `site_credential_audience`, lifetime `site_credential_ttl_s`, refreshable).
2. Embedded catalog: the agent then `register`s its `SiteRecord` once its gRPC server serves,
   `heartbeat`s every TTL/3 (an `UnknownSite` reply means the catalog forgot it, e.g. after
   a broker restart: register again), `refresh`es its credential before it expires and
   `leave`s on a clean shutdown. Every call needs the site credential of that same site.
3. Consul (`EDIF_CONSUL_ADDR` set on the broker): the reply names Consul's address and the
   agent registers there itself (`registry.ConsulCatalog`); these calls then answer 400.
4. `rejoin(credential, request)`: an agent that restarts (or a new HPC allocation of the same
   site) presents the site credential it stored instead of a join token; same reply, fresh
   credential. Once that credential has expired too, only a new join token gets it back in.

A site serving TLS sends its trust PEM in `JoinRequest.tls`; join and rejoin record it for the
gRPC client (`broker.site_tls.SiteTlsPins`), and a (re)join without it makes the site plaintext.

Either way the broker's routing follows the catalog (`broker.site_source.CatalogSites`).
Tokens are never logged; only site names are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import Claims, TokenIssuer, TokenVerifier
from broker.config import BrokerSettings
from broker.site_tls import SiteTlsPins, TlsOffer
from edif.clock import Clock
from edif.errors import BadRequest, PermissionDenied
from registry.catalog import Catalog
from registry.model import SITE_NAME, SiteRecord, split_address

log = logging.getLogger(__name__)


class JoinRequest(BaseModel):
    """What an agent says about itself when it joins."""

    model_config = ConfigDict(extra="ignore")

    site: str = Field(pattern=SITE_NAME.pattern)
    address: str  # the advertised gRPC host:port the broker will call
    institution: str = ""
    agent_version: str = ""
    tls: TlsOffer | None = None  # None: the agent serves plaintext gRPC

    def checked(self) -> JoinRequest:
        try:
            split_address(self.address)
        except ValueError as error:
            raise BadRequest(str(error)) from None
        return self


class CatalogInfo(BaseModel):
    kind: Literal["embedded", "consul"]
    address: str | None = None  # Consul's HTTP address; None for the embedded catalog


class JoinReply(BaseModel):
    site: str
    issuer: str
    jwks: dict[str, Any]
    credential: str  # the site credential: role site, for heartbeats and leaving
    credential_audience: str
    credential_expires_in_s: int
    catalog: CatalogInfo
    heartbeat_ttl_s: float
    deregister_after_s: float


class CredentialReply(BaseModel):
    credential: str
    credential_expires_in_s: int


class SiteRegistrar:
    """Join checks, site credentials, and the embedded catalog's agent-facing calls."""

    def __init__(
        self,
        keystore: KeyStore,
        settings: BrokerSettings,
        clock: Clock,
        embedded: Catalog | None,
        consul_address: str | None = None,
        tls_pins: SiteTlsPins | None = None,
        revoked: Callable[[str], bool] | None = None,
    ) -> None:
        self._settings = settings
        self._tls_pins = tls_pins
        self._keystore = keystore
        self._issuer = TokenIssuer(keystore, settings.issuer, clock)
        # `edif token revoke` applies to join tokens and site credentials as to researchers'
        # tokens: a revoked credential can no longer rejoin, renew, register or heartbeat.
        self._join_verifier = TokenVerifier(
            keystore,
            issuer=settings.issuer,
            audience=settings.audience,
            clock=clock,
            revoked=revoked,
        )
        self._credential_verifier = TokenVerifier(
            keystore,
            issuer=settings.issuer,
            audience=settings.site_credential_audience,
            clock=clock,
            revoked=revoked,
        )
        self._embedded = embedded
        self._catalog_info = (
            CatalogInfo(kind="embedded")
            if embedded is not None
            else CatalogInfo(kind="consul", address=consul_address)
        )

    def join(self, token: str | None, request: JoinRequest) -> JoinReply:
        request.checked()
        _site_claims(self._join_verifier.verify(token), request.site)
        log.info("site %s joined (advertises %s)", request.site, request.address)
        return self._admit(request)

    def rejoin(self, credential: str | None, request: JoinRequest) -> JoinReply:
        """Join again with the site credential an earlier join gave (no join token needed)."""
        request.checked()
        self._check_credential(credential, request.site)
        log.info("site %s rejoined (advertises %s)", request.site, request.address)
        return self._admit(request)

    def _admit(self, request: JoinRequest) -> JoinReply:
        if self._tls_pins is not None:
            self._tls_pins.record(request.site, request.tls)
        elif request.tls is not None:
            raise BadRequest("this broker cannot call sites over TLS (no TLS pin store)")
        credential = self._credential(request.site)
        return JoinReply(
            site=request.site,
            issuer=self._settings.issuer,
            jwks=self._keystore.jwks(),
            credential=credential.credential,
            credential_audience=self._settings.site_credential_audience,
            credential_expires_in_s=credential.credential_expires_in_s,
            catalog=self._catalog_info,
            heartbeat_ttl_s=self._settings.site_heartbeat_ttl_s,
            deregister_after_s=self._settings.site_deregister_after_s,
        )

    def refresh(self, token: str | None, site: str) -> CredentialReply:
        self._check_credential(token, site)
        return self._credential(site)

    async def register(self, token: str | None, site: str, record: SiteRecord) -> None:
        catalog = self._embedded_for(token, site)
        if record.site != site:
            raise PermissionDenied(f"a record for site {record.site!r} cannot register as {site!r}")
        await catalog.register(
            record, self._settings.site_heartbeat_ttl_s, self._settings.site_deregister_after_s
        )

    async def heartbeat(self, token: str | None, site: str) -> None:
        await self._embedded_for(token, site).heartbeat(site)  # UnknownSite: 404, register

    async def leave(self, token: str | None, site: str) -> None:
        await self._embedded_for(token, site).deregister(site)
        log.info("site %s left", site)

    def _embedded_for(self, token: str | None, site: str) -> Catalog:
        self._check_credential(token, site)
        if self._embedded is None:
            raise BadRequest(
                "this broker's sites register in Consul (see the join reply), not here"
            )
        return self._embedded

    def _check_credential(self, token: str | None, site: str) -> None:
        _site_claims(self._credential_verifier.verify(token), site)

    def _credential(self, site: str) -> CredentialReply:
        ttl = self._settings.site_credential_ttl_s
        token = self._issuer.issue(
            f"site:{site}",
            Role.SITE,
            ttl,
            audience=self._settings.site_credential_audience,
            site=site,
        )
        return CredentialReply(credential=token, credential_expires_in_s=ttl)


def _site_claims(claims: Claims, site: str) -> Claims:
    """The token speaks for `site` in role site, or PermissionDenied (403)."""
    if claims.role is not Role.SITE:
        raise PermissionDenied(f"a {claims.role} token cannot join or speak for a site")
    if claims.site != site:
        raise PermissionDenied(f"this token is for site {claims.site!r}, not {site!r}")
    return claims
