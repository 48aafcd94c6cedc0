"""Wiring: the one place the broker's parts meet their real implementations.

`build_app(settings)` reads the sites file, opens the site catalog that joined agents register
in (`EmbeddedCatalog` in this process, or Consul when `EDIF_CONSUL_ADDR` is set) and routes
to both, opens the key store (creating the signing key on
first use, so the JWKS that site agents fetch is never empty), and builds the token verifier
for researchers (audience `edif-broker`), the cached per-site broker credentials, the gRPC site
client, the site catalog, the disk result store and the job service behind the HTTP front. The
app's lifespan starts the service (Describe on every site, waiting up to `startup_wait_s`) and
on shutdown ends every unfinished job with ERROR. `run(settings)` serves it with uvicorn
(`BrokerServer`, which tells clients of unfinished jobs before it closes their sockets).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import uvicorn
from fastapi import FastAPI

from auth.keys import KeyStore
from auth.pseudonym import Pseudonymizer
from auth.revocation import RevocationList
from auth.roles import Role
from auth.tokens import TokenIssuer, TokenVerifier
from broker.admin_api import add_admin_api_routes
from broker.app import Lifespan, create_app
from broker.audit import JobAuditor, open_audit_log
from broker.audit.housekeeping import with_retention
from broker.catalog import SiteCatalog
from broker.config import BrokerSettings
from broker.credentials import CachedSiteCredentials
from broker.dashboard import add_dashboard_routes
from broker.join_api import add_join_routes
from broker.joins import SiteRegistrar
from broker.quotas.service import QuotaService
from broker.quotas.store import QuotaStore
from broker.results import DiskResultStore
from broker.service import BrokerService
from broker.site_source import CatalogSites
from broker.sites import GrpcSiteClient, SiteClient
from edif.clock import Clock, SystemClock
from registry.catalog import Catalog
from registry.consul import ConsulCatalog, ConsulSettings
from registry.embedded import EmbeddedCatalog


def build_app(
    settings: BrokerSettings | None = None,
    site_client: SiteClient | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """The broker app; `site_client` replaces the gRPC client (tests, in-process demos)."""
    settings = settings or BrokerSettings()
    clock = clock or SystemClock()
    keystore = KeyStore(settings.keys_dir) if settings.keys_dir else KeyStore.default()
    keystore.signing_key()
    revocations = RevocationList(keystore.directory, clock)
    verifier = TokenVerifier(
        keystore,
        issuer=settings.issuer,
        audience=settings.audience,
        clock=clock,
        revoked=revocations.is_revoked,
    )
    credentials = CachedSiteCredentials(
        TokenIssuer(keystore, settings.issuer, clock), Role.BROKER, clock, settings.site_token_ttl_s
    )
    sites = settings.load_sites()
    client = site_client or GrpcSiteClient(
        {site.name: site.address for site in sites},
        credentials,
        describe_timeout_s=settings.describe_timeout_s,
        max_message_bytes=settings.grpc_max_message_bytes,
    )
    consul = ConsulSettings()
    registry: Catalog = ConsulCatalog(consul) if consul.addr else EmbeddedCatalog(clock)
    catalog = SiteCatalog(
        sites,
        client,
        settings.describe_refresh_s,
        settings.startup_wait_s,
        source=CatalogSites(registry),
        on_addresses=client.update_addresses if isinstance(client, GrpcSiteClient) else None,
    )
    results = DiskResultStore(
        settings.data_dir / "results", clock, settings.result_ttl_s, settings.max_result_bytes
    )
    pseudonymize = Pseudonymizer.from_home(keystore.directory)
    quota_store = QuotaStore(settings.quota_db or settings.data_dir / "quotas.sqlite3")
    quotas = QuotaService(quota_store, pseudonymize, clock, settings.quota_defaults)
    # The audit log keeps its own, rotated pseudonym keys beside the signing keys (broker.audit).
    audit = (
        open_audit_log(
            settings.data_dir, keystore.directory, settings.audit_key_rotation_days * 86400, clock
        )
        if settings.audit_enabled
        else None
    )
    auditor = JobAuditor(audit, background=True)
    service = BrokerService(
        settings, catalog, client, results, pseudonymize, clock, quotas, auditor
    )
    lifespan = _flushing(lifespan_for(service, registry), auditor)
    if audit is not None:
        lifespan = with_retention(lifespan, audit, settings.audit_detailed_retention_days * 86400)
    app = create_app(service, verifier, settings, keystore.jwks, lifespan)
    embedded = registry if isinstance(registry, EmbeddedCatalog) else None
    add_join_routes(app, SiteRegistrar(keystore, settings, clock, embedded, consul.addr))
    add_admin_api_routes(app, quotas, verifier)
    add_dashboard_routes(app, quotas, verifier, audit, service.deployments, clock)
    app.state.service = service
    app.state.quotas = quotas
    app.state.registry = registry
    return app


def lifespan_for(
    service: BrokerService, registry: Catalog | None = None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()
            if registry is not None:
                await registry.aclose()

    return lifespan


class BrokerServer(uvicorn.Server):
    """uvicorn, but unfinished jobs get their ERROR before uvicorn closes the websockets.

    uvicorn closes every connection before the lifespan shutdown runs, which would leave
    blocking clients with a closed socket and no terminal status (spec §13).
    """

    def __init__(self, config: uvicorn.Config, before_shutdown: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self._before_shutdown = before_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._before_shutdown()
        await super().shutdown(sockets)


def server_for(app: FastAPI, service: BrokerService, **options: object) -> BrokerServer:
    config = uvicorn.Config(
        app,
        ws_ping_interval=20,  # protocol pings (payload < 126 bytes) keep idle sockets alive
        log_level="warning",
        timeout_graceful_shutdown=10,
        **options,
    )
    return BrokerServer(config, service.close)


def run(settings: BrokerSettings | None = None) -> None:
    """Serve the broker until interrupted."""
    settings = settings or BrokerSettings()
    app = build_app(settings)
    server_for(app, app.state.service, host=settings.host, port=settings.port).run()


def _flushing(lifespan: Lifespan, auditor: JobAuditor) -> Lifespan:
    """Write the audit entries still queued (the service's shutdown adds some) before exiting."""

    @asynccontextmanager
    async def wrapped(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with lifespan(app):
                yield
        finally:
            await asyncio.to_thread(auditor.close)

    return wrapped
