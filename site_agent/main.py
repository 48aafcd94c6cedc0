"""Run a site agent: load the site config, start model workers on Ray, serve gRPC.

Flow (`edif agent run`; `edif agent join` is `site_agent.join`, which reuses `start_agent`):
validate the config → detect hardware → fetch the trusted broker's public keys →
connect to Ray (`--ray-address`) or start a local one → start the gRPC server (Describe
answers at once, models show DEPLOYING) → load every model in its own worker → mark them
healthy → serve until SIGINT/SIGTERM, then stop taking calls and shut down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

from auth.keys import public_keys_from_jwks
from auth.remote_jwks import RemoteJwks
from auth.roles import Role
from auth.tokens import Claims, TokenVerifier
from edif.errors import ConfigError, PermissionDenied
from site_agent import ray_pool
from site_agent.config import SiteConfig, TlsConfig, load_site_config
from site_agent.draining import DrainingExecutor
from site_agent.executor import PoolExecutor
from site_agent.hardware import detect
from site_agent.servicer import build_server, set_health
from site_agent.telemetry import AgentTelemetry, start_telemetry

log = logging.getLogger("edif.agent")


class AgentSettings(BaseSettings):
    """Process settings (`EDIF_AGENT_*`); command-line options override them."""

    model_config = SettingsConfigDict(env_prefix="EDIF_AGENT_", extra="ignore")

    site_file: Path | None = None
    ray_address: str | None = None
    listen: str | None = None
    broker_jwks: str | None = None
    ray_num_cpus: int | None = None
    jwks_wait_s: float = 60.0
    execution_time_s: float | None = None  # overrides the site config's limit (tests, demo)
    # Where `edif agent join` keeps the site credential (0600); default $EDIF_HOME/agent/<site>.
    state_dir: Path | None = None
    # Telemetry (`site_agent.telemetry`): /metrics on this port (None: off), spans to a
    # JSON-lines file, JSON log lines (ts, level, logger, msg, job_id, trace_id).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    traces_file: Path | None = None
    log_format: Literal["text", "json"] = "text"


def load_jwks(source: str, wait_s: float) -> dict:
    """The broker's JWKS from a file or URL; a URL is retried while the broker starts."""
    if not source:
        raise ConfigError(
            "no broker JWKS configured: set broker.jwks in the site config "
            "or pass --broker-jwks (a file or the broker's /.well-known/jwks.json)"
        )
    if not source.startswith(("http://", "https://")):
        try:
            return json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read broker JWKS {source}: {exc}") from exc
    deadline = time.monotonic() + wait_s
    while True:
        try:
            reply = httpx.get(source, timeout=5.0)
            reply.raise_for_status()
            return reply.json()
        except (httpx.HTTPError, ValueError) as exc:
            if time.monotonic() > deadline:
                raise ConfigError(f"broker JWKS at {source} unreachable: {exc}") from exc
            time.sleep(0.5)


def broker_verifier(cfg: SiteConfig, jwks: dict, jwks_url: str | None = None):
    """A verify(token) callable accepting only broker-role tokens addressed to this site.

    With `jwks_url` (the broker's /.well-known/jwks.json) a token signed by a key the agent
    has not seen refetches the JWKS (rate-limited), so a broker key rotation needs no agent
    restart; the set is also refreshed every few minutes, so retired keys drop out.
    """
    keys: Any = public_keys_from_jwks(jwks)
    if jwks_url and jwks_url.startswith(("http://", "https://")):
        keys = RemoteJwks(
            jwks_url, public_keys_from_jwks, initial=keys, min_refetch_s=5.0, max_age_s=300.0
        )
    verifier = TokenVerifier(keys, issuer=cfg.broker.issuer, audience=f"edif-site:{cfg.site}")

    def verify(token: str | None) -> Claims:
        claims = verifier.verify(token)
        if claims.role != Role.BROKER:
            raise PermissionDenied(f"role {claims.role} may not call site agents")
        return claims

    return verify


@dataclass
class RunningAgent:
    """A started agent: its gRPC server (serving), executor and the model-loading task.

    `front` is what the server calls: the executor plus draining and handing jobs back.
    """

    server: grpc.aio.Server
    health: Any
    executor: PoolExecutor
    front: DrainingExecutor
    port: int
    loading: asyncio.Task
    telemetry: AgentTelemetry | None = None

    async def stop_taking_work(self) -> None:
        """Describe says draining, health says NOT_SERVING, new jobs are handed back."""
        self.front.start_draining()
        await set_health(self.health, {key: False for key in self.executor.slots})

    async def drain(self, timeout_s: float) -> None:
        """Stop taking work and wait (up to `timeout_s`) for running and queued jobs."""
        await self.stop_taking_work()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.busy() and loop.time() < deadline:
            await asyncio.sleep(0.2)

    def busy(self) -> int:
        return sum(slot.queue_depth for slot in self.executor.slots.values())

    async def stop(self, grace_s: float = 5.0) -> None:
        self.loading.cancel()
        await self.server.stop(grace=grace_s)
        if self.telemetry is not None:
            self.telemetry.close()


async def start_agent(
    cfg: SiteConfig,
    settings: AgentSettings,
    jwks: dict,
    on_loaded: Callable[[PoolExecutor, SiteConfig], None] | None = None,
    jwks_url: str | None = None,
) -> RunningAgent:
    """Serve gRPC now (models show DEPLOYING) and load the models in the background."""
    verify = broker_verifier(cfg, jwks, jwks_url)
    _check_sandbox(cfg)
    hardware = detect()
    ray_pool.connect(settings.ray_address, settings.ray_num_cpus)
    executor = PoolExecutor(cfg, ray_pool.RayWorkerFactory(cfg.limits.result_chunk_bytes), hardware)
    front = DrainingExecutor(executor)
    telemetry = start_telemetry(
        cfg.site,
        executor.slots,
        metrics_host=settings.metrics_host,
        metrics_port=settings.metrics_port,
        traces_file=settings.traces_file,
        log_format=settings.log_format,
    )
    server, health = build_server(front, verify, list(executor.slots), telemetry)
    listen = settings.listen or cfg.listen
    port = bind(server, listen, cfg.tls)
    await server.start()
    await set_health(health, {key: False for key in executor.slots})
    tls = "off" if cfg.tls is None else ("mTLS" if cfg.tls.client_ca else "on")
    print(f"edif-agent listening site={cfg.site} port={port} tls={tls}", flush=True)
    loading = asyncio.create_task(_load(executor, health, cfg, on_loaded or _print_summary))
    return RunningAgent(server, health, executor, front, port, loading, telemetry)


def bind(server: grpc.aio.Server, listen: str, tls: TlsConfig | None) -> int:
    """Listen on `listen`: TLS only when configured (then never plaintext); the port."""
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, server_credentials(tls))
    if port == 0:
        raise ConfigError(f"cannot listen on {listen}")
    return port


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    client_ca = read_pem(tls.client_ca, "tls.client_ca") if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(read_pem(tls.key, "tls.key"), read_pem(tls.cert, "tls.cert"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def read_pem(path: Path, field: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"site config {field}: cannot read {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise ConfigError(f"site config {field}: {path} is not a PEM file")
    return data


def _check_sandbox(cfg: SiteConfig) -> None:
    """Say what the sandbox enforces here; refuse to serve if a required layer is missing."""
    from site_agent.sandbox_startup import check_sandbox

    check_sandbox(cfg, say=lambda line: print(line, flush=True))


def stop_event() -> asyncio.Event:
    """Set on SIGINT or SIGTERM (a service manager's stop, `edif agent leave`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(cfg: SiteConfig, settings: AgentSettings) -> None:
    source = settings.broker_jwks or cfg.broker.jwks
    jwks = load_jwks(source, settings.jwks_wait_s)
    agent = await start_agent(cfg, settings, jwks, jwks_url=source)
    await stop_event().wait()
    await agent.stop()


async def _load(
    executor: PoolExecutor,
    health,
    cfg: SiteConfig,
    on_loaded: Callable[[PoolExecutor, SiteConfig], None],
) -> None:
    await executor.start()
    await set_health(health, {k: s.state.value == "RUNNING" for k, s in executor.slots.items()})
    on_loaded(executor, cfg)


def _print_summary(executor: PoolExecutor, cfg: SiteConfig) -> None:
    hw = executor.hardware
    print(
        f"edif-agent ready site={cfg.site} hardware={hw.vendor}:{hw.device_type}x{hw.count}",
        flush=True,
    )
    for slot in executor.slots.values():
        print(
            f"  {slot.cfg.repo_id:<40} {slot.cfg.task:<16} {slot.state.value}"
            f"{'  ' + slot.last_error if slot.last_error else ''}",
            flush=True,
        )


def run(site_file: Path, settings: AgentSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_site_config(site_file)
    if settings.execution_time_s:
        limits = cfg.limits.model_copy(update={"execution_time_s": settings.execution_time_s})
        cfg = cfg.model_copy(update={"limits": limits})
    asyncio.run(serve(cfg, settings))
