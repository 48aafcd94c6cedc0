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
from typing import Any

import grpc
import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

from auth.keys import public_keys_from_jwks
from auth.roles import Role
from auth.tokens import Claims, TokenVerifier
from edif.errors import ConfigError, PermissionDenied
from site_agent import ray_pool
from site_agent.config import SiteConfig, load_site_config
from site_agent.executor import PoolExecutor
from site_agent.hardware import detect
from site_agent.servicer import build_server, set_health

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


def broker_verifier(cfg: SiteConfig, jwks: dict):
    """A verify(token) callable accepting only broker-role tokens addressed to this site."""
    keys = public_keys_from_jwks(jwks)
    verifier = TokenVerifier(keys, issuer=cfg.broker.issuer, audience=f"edif-site:{cfg.site}")

    def verify(token: str | None) -> Claims:
        claims = verifier.verify(token)
        if claims.role != Role.BROKER:
            raise PermissionDenied(f"role {claims.role} may not call site agents")
        return claims

    return verify


@dataclass
class RunningAgent:
    """A started agent: its gRPC server (serving), executor and the model-loading task."""

    server: grpc.aio.Server
    health: Any
    executor: PoolExecutor
    port: int
    loading: asyncio.Task

    async def drain(self, timeout_s: float) -> None:
        """Stop looking healthy and wait (up to `timeout_s`) for running and queued jobs."""
        await set_health(self.health, {key: False for key in self.executor.slots})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.busy() and loop.time() < deadline:
            await asyncio.sleep(0.2)

    def busy(self) -> int:
        return sum(slot.queue_depth for slot in self.executor.slots.values())

    async def stop(self, grace_s: float = 5.0) -> None:
        self.loading.cancel()
        await self.server.stop(grace=grace_s)


async def start_agent(
    cfg: SiteConfig,
    settings: AgentSettings,
    jwks: dict,
    on_loaded: Callable[[PoolExecutor, SiteConfig], None] | None = None,
) -> RunningAgent:
    """Serve gRPC now (models show DEPLOYING) and load the models in the background."""
    verify = broker_verifier(cfg, jwks)
    _check_sandbox(cfg)
    hardware = detect()
    ray_pool.connect(settings.ray_address, settings.ray_num_cpus)
    executor = PoolExecutor(cfg, ray_pool.RayWorkerFactory(cfg.limits.result_chunk_bytes), hardware)
    server, health = build_server(executor, verify, list(executor.slots))
    listen = settings.listen or cfg.listen
    port = server.add_insecure_port(listen)
    if port == 0:
        raise ConfigError(f"cannot listen on {listen}")
    await server.start()
    await set_health(health, {key: False for key in executor.slots})
    print(f"edif-agent listening site={cfg.site} port={port}", flush=True)
    loading = asyncio.create_task(_load(executor, health, cfg, on_loaded or _print_summary))
    return RunningAgent(server, health, executor, port, loading)


def _check_sandbox(cfg: SiteConfig) -> None:
    """Say whether job threads can be contained here; refuse to serve if required and not."""
    from site_agent.containment import probe

    support = probe()
    if support.available:
        print(f"edif-agent sandbox: seccomp job-thread containment on ({support.reason})")
        return
    if cfg.sandbox.require_seccomp:
        raise ConfigError(
            f"site {cfg.site}: this machine cannot contain job threads with seccomp "
            f"({support.reason}); install libseccomp2 and the pyseccomp package, or set "
            "`sandbox: {require_seccomp: false}` in the site config to serve without it"
        )
    print(
        f"edif-agent sandbox: WARNING seccomp unavailable ({support.reason}); serving "
        "WITHOUT OS-level containment because the site config sets require_seccomp: false",
        flush=True,
    )


def stop_event() -> asyncio.Event:
    """Set on SIGINT or SIGTERM (a service manager's stop, `edif agent leave`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(cfg: SiteConfig, settings: AgentSettings) -> None:
    jwks = load_jwks(settings.broker_jwks or cfg.broker.jwks, settings.jwks_wait_s)
    agent = await start_agent(cfg, settings, jwks)
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
