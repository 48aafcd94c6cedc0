"""`edif agent join`: one command takes a site from its YAML to serving the federation.

Flow: validate the site config → detect hardware → estimate every model's memory and place
the models (`site_agent.autoplace`; fails here, before anything loads, if they do not fit) →
`POST /sites/join` with the operator's short-lived join token (refused: exit 1, nothing
started) → start the agent with the broker's JWKS and issuer from the reply (`start_agent`:
gRPC serves at once, models load in the background) → register in the catalog the reply names
(the broker's embedded catalog over HTTP, or Consul directly) and heartbeat every TTL/3,
registering again whenever the catalog forgot the site → print a summary table once the models
are loaded → on SIGTERM/SIGINT (`edif agent leave`, a service manager's stop): deregister
first so no new work arrives, drain running jobs up to `drain_timeout_s`, stop, exit 0.

A pidfile `$EDIF_HOME/run/agent-<site>.pid` lets `edif agent leave --site FILE` find the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.joins import JoinReply, JoinRequest
from edif.config import edif_home
from edif.errors import ConfigError, EdifError, UnknownSite
from registry.catalog import Catalog
from registry.consul import ConsulCatalog, ConsulSettings
from registry.model import Hardware, ModelEntry, SiteRecord, Versions
from site_agent.autoplace import PlannedModel, plan_models
from site_agent.broker_link import BrokerHostedCatalog, BrokerLink
from site_agent.config import SiteConfig, load_site_config
from site_agent.executor import PoolExecutor, versions
from site_agent.hardware import DetectedHardware, detect
from site_agent.main import AgentSettings, RunningAgent, start_agent, stop_event
from site_agent.memory import GB

log = logging.getLogger("edif.agent.join")

_VENDORS = {"nvidia": "cuda", "amd": "rocm", "cpu": "cpu"}


@dataclass(frozen=True)
class JoinOptions:
    broker_url: str
    join_token: str
    advertise: str | None = None  # host:port the broker calls; default: the listen address
    drain_timeout_s: float = 60.0


def pidfile_for(site: str) -> Path:
    return edif_home() / "run" / f"agent-{site}.pid"


def run_join(site_file: Path, options: JoinOptions, settings: AgentSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    cfg = load_site_config(site_file)
    if settings.execution_time_s:
        limits = cfg.limits.model_copy(update={"execution_time_s": settings.execution_time_s})
        cfg = cfg.model_copy(update={"limits": limits})
    hardware = detect()
    cfg, planned = plan_models(cfg, hardware)
    listen = settings.listen or cfg.listen
    advertise = options.advertise or listen
    if advertise.rpartition(":")[0] in ("0.0.0.0", "[::]", ""):
        raise ConfigError(f"listening on {listen}: pass --advertise HOST:PORT the broker can reach")
    asyncio.run(_join_and_serve(cfg, settings, options, advertise, hardware, planned))


async def _join_and_serve(
    cfg: SiteConfig,
    settings: AgentSettings,
    options: JoinOptions,
    advertise: str,
    hardware: DetectedHardware,
    planned: list[PlannedModel],
) -> None:
    link = BrokerLink(options.broker_url)
    try:
        request = JoinRequest(site=cfg.site, address=advertise, institution=cfg.institution)
        reply = await link.join(options.join_token, request)
        print(f"edif-agent joined broker={link.url} site={cfg.site}", flush=True)
        cfg = cfg.model_copy(
            update={"broker": cfg.broker.model_copy(update={"issuer": reply.issuer})}
        )
        agent = await start_agent(
            cfg, settings, reply.jwks, lambda ex, c: print_summary(ex, c, planned)
        )
        catalog = _catalog_for(link, reply)
        await _serve_joined(cfg, agent, catalog, reply, options, advertise, hardware)
    finally:
        await link.aclose()


async def _serve_joined(
    cfg: SiteConfig,
    agent: RunningAgent,
    catalog: Catalog,
    reply: JoinReply,
    options: JoinOptions,
    advertise: str,
    hardware: DetectedHardware,
) -> None:
    pidfile = pidfile_for(cfg.site)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{os.getpid()}\n")
    stop = stop_event()
    record = lambda: site_record(cfg, agent.executor, advertise, hardware)  # noqa: E731
    keeper = asyncio.create_task(keep_registered(catalog, record, reply), name="registration")
    try:
        await stop.wait()
        # A second SIGTERM during the drain ends the process (a service manager's kill timeout).
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        print(f"edif-agent leaving site={cfg.site}: draining", flush=True)
        keeper.cancel()
        with contextlib.suppress(EdifError):  # the broker may be gone already (mesh shutdown)
            await catalog.deregister(cfg.site)
        await agent.drain(options.drain_timeout_s)
        print(f"edif-agent left site={cfg.site} unfinished_jobs={agent.busy()}", flush=True)
    finally:
        keeper.cancel()
        await agent.stop()
        await catalog.aclose()
        with contextlib.suppress(FileNotFoundError):
            if pidfile.read_text().strip() == str(os.getpid()):
                pidfile.unlink()


async def keep_registered(
    catalog: Catalog, record: Callable[[], SiteRecord], reply: JoinReply
) -> None:
    """Register, then heartbeat every TTL/3; register again when the catalog forgot the site.

    Failures (broker or Consul down) are logged and retried: the agent keeps serving, and the
    catalog marks it critical by itself if it stays unreachable.
    """
    interval = max(0.2, reply.heartbeat_ttl_s / 3)
    registered = False
    while True:
        try:
            if not registered:
                await catalog.register(record(), reply.heartbeat_ttl_s, reply.deregister_after_s)
                registered = True
                log.info("registered in the %s catalog", reply.catalog.kind)
            else:
                await catalog.heartbeat(reply.site)
        except UnknownSite:
            log.warning("the catalog forgot this site; registering again")
            registered = False
            continue
        except EdifError as error:
            log.warning("catalog call failed: %s", error.message)
        await asyncio.sleep(interval)


def site_record(
    cfg: SiteConfig, executor: PoolExecutor, address: str, hardware: DetectedHardware
) -> SiteRecord:
    found = versions()
    return SiteRecord(
        site=cfg.site,
        institution=cfg.institution,
        grpc_address=address,
        agent_version=found.get("edif", ""),
        versions=Versions(**{k: found[k] for k in ("nnsight", "torch", "transformers", "python")}),
        hardware=Hardware(
            vendor=_VENDORS.get(hardware.vendor, "cpu"),
            device_type=hardware.device_type,
            count=hardware.count,
            total_memory_bytes=hardware.memory_bytes,
        ),
        models=[
            ModelEntry(
                model_key=slot.cfg.model_key,
                repo_id=slot.cfg.repo_id,
                revision=slot.cfg.revision or "",
                task=slot.cfg.task,
                state=slot.state.value,
            )
            for slot in executor.slots.values()
        ],
        allowed_groups=list(cfg.access.allowed_groups),
        max_concurrent_jobs=cfg.access.max_concurrent_jobs,
    )


def print_summary(executor: PoolExecutor, cfg: SiteConfig, planned: list[PlannedModel]) -> None:
    hw = executor.hardware
    print(
        f"edif-agent ready site={cfg.site} hardware={hw.vendor}:{hw.device_type}x{hw.count} "
        f"({hw.memory_bytes / GB:.1f} GB per device)",
        flush=True,
    )
    print(f"  {'model':<36} {'params':>10} {'est. GB':>8}  {'placement':<16} state", flush=True)
    for plan, slot in zip(planned, executor.slots.values(), strict=True):
        est = plan.estimate
        print(
            f"  {plan.model.repo_id:<36} {est.parameter_count:>10,} "
            f"{est.total_bytes / GB:>8.2f}  {plan.where:<16} {slot.state.value}"
            f"{'  ' + slot.last_error if slot.last_error else ''}",
            flush=True,
        )


def leave(site_file: Path, timeout_s: float) -> int:
    """Ask the running agent of this site to leave (SIGTERM) and wait until it has; its pid."""
    site = load_site_config(site_file).site
    pidfile = pidfile_for(site)
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError) as error:
        raise ConfigError(f"no running agent for site {site} ({pidfile}: {error})") from error
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError as error:
        pidfile.unlink(missing_ok=True)
        raise ConfigError(f"the agent of site {site} (pid {pid}) is not running") from error
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            raise ConfigError(f"the agent of site {site} (pid {pid}) is still draining")
        time.sleep(0.2)
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An exited process its parent has not reaped yet (a zombie) still answers kill(0).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): trust kill(0)
    return stat.rpartition(")")[2].split()[0] != "Z"


def _catalog_for(link: BrokerLink, reply: JoinReply) -> Catalog:
    if reply.catalog.kind == "embedded":
        return BrokerHostedCatalog(link, reply)
    # Consul's address comes from the broker; an ACL token, if any, from EDIF_CONSUL_TOKEN.
    return ConsulCatalog(ConsulSettings(addr=reply.catalog.address))
