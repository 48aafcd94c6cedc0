"""Wiring: the one place the broker's parts meet their real implementations.

`build_app(settings)` reads the sites file, opens the site catalog that joined agents register
in (`EmbeddedCatalog` in this process, or Consul when `EDIF_CONSUL_ADDR` is set) and routes
to both, opens the key store (creating the signing key on
first use, so the JWKS that site agents fetch is never empty), and builds the token verifier
for researchers (audience `edif-broker`), the cached per-site broker credentials, the gRPC site
client, the site catalog, the result store (disk or S3) and the job service behind the HTTP
front. The app's lifespan starts the service (Describe on every site, waiting up to
`startup_wait_s`) and on shutdown ends every unfinished job with ERROR. `run(settings)` serves
it with uvicorn (`BrokerServer`, which tells clients of unfinished jobs before it closes their
sockets).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import uvicorn
from fastapi import FastAPI

from auth.external import IssuerRouter
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
from broker.fairshare import ORDERS, DecayedUsage, FairShareScheduler
from broker.jobstore import open_job_store
from broker.join_api import add_join_routes
from broker.joins import SiteRegistrar
from broker.quotas.service import QuotaService
from broker.quotas.store import QuotaStore
from broker.results.factory import open_result_store
from broker.service import BrokerService
from broker.site_source import CatalogSites
from broker.site_tls import SiteTlsPins
from broker.sites import GrpcSiteClient, SiteClient
from broker.telemetry import BrokerTelemetry
from broker.telemetry.http import add_telemetry_routes
from edif.clock import Clock, SystemClock
from edif.telemetry import configure_logging
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
    keystore = KeyStore(settings.keys_dir or KeyStore.default().directory, clock)
    keystore.signing_key()
    revocations = RevocationList(keystore.directory, clock)
    local = TokenVerifier(
        keystore,
        issuer=settings.issuer,
        audience=settings.audience,
        clock=clock,
        revoked=revocations.is_revoked,
    )
    # Our own tokens (keys re-read per call: rotations apply without a restart), plus the
    # institutions' OIDC providers, chosen by the token's `iss` (auth.external).
    verifier = IssuerRouter.build(
        local, settings.issuer, settings.external_issuers, clock, revocations.is_revoked
    )
    credentials = CachedSiteCredentials(
        TokenIssuer(keystore, settings.issuer, clock), Role.BROKER, clock, settings.site_token_ttl_s
    )
    sites = settings.load_sites()
    telemetry = BrokerTelemetry.from_settings(settings.traces_file)
    tls_pins = SiteTlsPins(  # which joined sites serve TLS, verified against what (site_tls)
        settings.data_dir / "site-tls",
        settings.site_ca_file,
        settings.site_client_cert_file,
        settings.site_client_key_file,
    )
    client = site_client or GrpcSiteClient(
        {site.name: site.address for site in sites},
        credentials,
        describe_timeout_s=settings.describe_timeout_s,
        max_message_bytes=settings.grpc_max_message_bytes,
        tls=tls_pins,
        observer=telemetry,
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
    results = open_result_store(settings, clock)  # disk, or S3 with result_store=s3
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
    fairshare = _fair_share(settings, catalog, clock, quota_store)
    service = BrokerService(
        settings,
        catalog,
        client,
        results,
        pseudonymize,
        clock,
        quotas,
        auditor,
        fairshare=fairshare,
        jobs=open_job_store(settings, clock),
        observer=telemetry,
    )
    store_dir = "results" if settings.result_store == "disk" else "results-spool"
    telemetry.watch(
        sites=lambda: {view.name: view.reachable for view in catalog.views()},
        result_store=settings.data_dir / store_dir,
    )
    lifespan = _flushing(lifespan_for(service, registry), auditor)
    if audit is not None:
        lifespan = with_retention(lifespan, audit, settings.audit_detailed_retention_days * 86400)
    app = create_app(service, verifier, settings, keystore.jwks, lifespan)
    if settings.metrics_enabled:
        add_telemetry_routes(app, telemetry)
    embedded = registry if isinstance(registry, EmbeddedCatalog) else None
    add_join_routes(
        app,
        SiteRegistrar(
            keystore,
            settings,
            clock,
            embedded,
            consul.addr,
            tls_pins,
            revoked=revocations.is_revoked,
        ),
    )
    add_admin_api_routes(app, quotas, verifier, audit)
    add_dashboard_routes(app, quotas, verifier, audit, service.deployments, clock)
    app.state.service = service
    app.state.quotas = quotas
    app.state.registry = registry
    app.state.telemetry = telemetry
    return app


def _fair_share(
    settings: BrokerSettings, catalog: SiteCatalog, clock: Clock, ledger: QuotaStore
) -> FairShareScheduler | None:
    """The broker-side fair-share queues (`broker.fairshare`), unless turned off. Recent usage
    starts from the quota ledger (ten half-lives back), so a restart forgets nobody's use."""
    if not settings.fair_share_enabled:
        return None
    usage = DecayedUsage(settings.fair_share_half_life_s, clock)
    horizon = clock.now() - 10 * settings.fair_share_half_life_s
    usage.seed(ledger.charges("user", horizon), clock.now())
    return FairShareScheduler(
        usage,
        catalog.max_concurrent_jobs,
        clock,
        jobs_per_worker=settings.fair_share_jobs_per_worker,
        unroutable_s=settings.fair_share_unroutable_s,
        order=ORDERS[settings.fair_share_order],
    )


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


# uvloop's event loop and the httptools parser, not asyncio's loop and h11: every job crosses
# the loop a few dozen times (HTTP, websocket frames, gRPC, thread hand-offs), and against
# bench/ideal_broker.py on the same stack they took ~2 ms off the broker + agent fixed
# overhead per small job (16.8 -> 14.7 ms p50; docs/benchmarks.md section 1, run L).
HTTP_IMPL = "httptools"
LOOP_IMPL = "uvloop"


def server_for(app: FastAPI, service: BrokerService, **options: object) -> BrokerServer:
    config = uvicorn.Config(
        app,
        http=HTTP_IMPL,
        loop=LOOP_IMPL,
        ws_ping_interval=20,  # protocol pings (payload < 126 bytes) keep idle sockets alive
        log_level="warning",
        timeout_graceful_shutdown=10,
        **options,
    )
    return BrokerServer(config, service.close)


def run(settings: BrokerSettings | None = None) -> None:
    """Serve the broker until interrupted."""
    settings = settings or BrokerSettings()
    configure_logging(settings.log_format)
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
