"""`edif agent join`: one command takes a site from its YAML to serving the federation.

Flow: validate the site config → detect hardware → estimate every model's memory and place
the models (`site_agent.autoplace`; fails here, before anything loads, if they do not fit) →
`POST /sites/join` with the operator's short-lived join token, or `POST /sites/{site}/rejoin`
with the site credential stored by an earlier run (`join_or_rejoin`; refused: exit 1, nothing
started; the credential is stored 0600 and renewed while the agent runs, see
`site_agent.credential_store`) → start the agent with the broker's JWKS and issuer from the
reply, serving TLS when the site config has `tls:` (`start_agent`:
gRPC serves at once, models load in the background) → register in the catalog the reply names
(the broker's embedded catalog over HTTP, or Consul directly) and heartbeat every TTL/3,
registering again whenever the catalog forgot the site → print a summary table once the models
are loaded → on SIGTERM/SIGINT (`edif agent leave`, a service manager's stop): deregister
first so no new work arrives, drain running jobs up to `drain_timeout_s`, stop, exit 0.

With a walltime (`--walltime`, or found under Slurm: `site_agent.walltime`) the agent also
leaves by itself: ahead of the allocation's end it stops taking work, finishes or hands back
its jobs (the broker re-dispatches them), deregisters and exits 0; the next allocation rejoins
with the stored credential.

A pidfile `$EDIF_HOME/run/agent-<site>.pid` lets `edif agent leave --site FILE` find the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from broker.joins import JoinReply, JoinRequest
from broker.site_tls import TlsOffer
from edif.clock import Clock, SystemClock
from edif.config import edif_home
from edif.errors import AuthenticationError, ConfigError, EdifError, PermissionDenied, UnknownSite
from registry.catalog import Catalog
from registry.consul import ConsulCatalog, ConsulSettings
from registry.model import Hardware, ModelEntry, SiteRecord, Versions
from site_agent.autoplace import PlannedModel, plan_models
from site_agent.broker_link import BrokerHostedCatalog, BrokerLink, CredentialKeeper
from site_agent.config import SiteConfig, load_site_config
from site_agent.credential_store import CredentialFile, describe_expiry, state_dir_for
from site_agent.executor import PoolExecutor, versions
from site_agent.hardware import DetectedHardware, detect
from site_agent.main import AgentSettings, RunningAgent, read_pem, start_agent, stop_event
from site_agent.memory import GB
from site_agent.walltime import Allocation, Phase, allocation_end, follow_allocation

log = logging.getLogger("edif.agent.join")

_VENDORS = {"nvidia": "cuda", "amd": "rocm", "cpu": "cpu"}


@dataclass(frozen=True)
class JoinOptions:
    broker_url: str
    join_token: str | None  # None: rejoin with the stored site credential
    advertise: str | None = None  # host:port the broker calls; default: the listen address
    drain_timeout_s: float = 60.0
    walltime: str | None = None  # Slurm time string; None: found under Slurm, or none
    env: Mapping[str, str] = field(default_factory=dict)  # the process environment (Slurm)


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
    allocation = _allocation(cfg, options, SystemClock())
    if allocation is not None and allocation.phase(time.time()) is not Phase.SERVING:
        print(f"edif-agent not joining site={cfg.site}: the allocation ends too soon", flush=True)
        return
    asyncio.run(_join_and_serve(cfg, settings, options, advertise, hardware, planned, allocation))


def _allocation(cfg: SiteConfig, options: JoinOptions, clock: Clock) -> Allocation | None:
    found = allocation_end(options.walltime, options.env, clock.now())
    if found is None:
        return None
    ends_at, source = found
    allocation = Allocation(ends_at, cfg.walltime.drain_margin_s, cfg.walltime.handback_margin_s)
    print(
        f"edif-agent walltime site={cfg.site} source={source!r} ends_at={ends_at:.3f} "
        f"drain_at={allocation.drain_at:.3f} handback_at={allocation.handback_at:.3f} "
        f"(ends {_utc(ends_at)})",
        flush=True,
    )
    return allocation


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


class Joiner(Protocol):
    url: str

    async def join(self, join_token: str, request: JoinRequest) -> JoinReply: ...

    async def rejoin(self, credential: str, request: JoinRequest) -> JoinReply: ...


async def join_or_rejoin(
    link: Joiner,
    request: JoinRequest,
    join_token: str | None,
    stored_file: CredentialFile,
    clock: Clock,
) -> JoinReply:
    """Rejoin with the stored site credential while it is valid, else join with the token.

    A refused credential (revoked, the broker's keys changed) falls back to the token; when
    neither works the error says both, and how to get a new join token.
    """
    stored = stored_file.load()
    refused = ""
    if stored is not None and stored.usable(link.url, request.site, clock.now()):
        try:
            reply = await link.rejoin(stored.credential, request)
            print(
                f"edif-agent rejoined with the stored site credential site={request.site}",
                flush=True,
            )
            return reply
        except (AuthenticationError, PermissionDenied) as error:
            refused = f"the stored site credential was refused ({error.message})"
    credential_state = refused or f"no usable site credential ({describe_expiry(stored)})"
    if not join_token:
        raise ConfigError(_need_token(request.site, "no join token was given", credential_state))
    try:
        return await link.join(join_token, request)
    except AuthenticationError as error:
        token_state = f"the join token was refused ({error.message})"
        raise ConfigError(_need_token(request.site, token_state, credential_state)) from None


def _need_token(site: str, token_state: str, credential_state: str) -> str:
    return (
        f"site {site} cannot join: {token_state}, and {credential_state}. Ask the broker's "
        f"operator for a new join token (edif token issue --role site --site {site} --ttl 15m) "
        "and pass it with --token or EDIF_JOIN_TOKEN."
    )


def _tls_offer(cfg: SiteConfig) -> TlsOffer | None:
    if cfg.tls is None:
        return None
    trust = read_pem(cfg.tls.ca, "tls.ca") if cfg.tls.ca else read_pem(cfg.tls.cert, "tls.cert")
    return TlsOffer(trust_pem=trust.decode(), server_name=cfg.tls.server_name)


async def _join_and_serve(
    cfg: SiteConfig,
    settings: AgentSettings,
    options: JoinOptions,
    advertise: str,
    hardware: DetectedHardware,
    planned: list[PlannedModel],
    allocation: Allocation | None,
) -> None:
    link = BrokerLink(options.broker_url)
    clock = SystemClock()
    try:
        request = JoinRequest(
            site=cfg.site, address=advertise, institution=cfg.institution, tls=_tls_offer(cfg)
        )
        stored = CredentialFile(state_dir_for(cfg.site, settings.state_dir))
        reply = await join_or_rejoin(link, request, options.join_token, stored, clock)
        keeper = CredentialKeeper(link, stored, reply, clock)
        print(f"edif-agent joined broker={link.url} site={cfg.site}", flush=True)
        cfg = cfg.model_copy(
            update={"broker": cfg.broker.model_copy(update={"issuer": reply.issuer})}
        )
        agent = await start_agent(
            cfg,
            settings,
            reply.jwks,
            lambda ex, c: print_summary(ex, c, planned),
            jwks_url=f"{link.url}/.well-known/jwks.json",  # refetched after a key rotation
        )
        catalog = _catalog_for(link, reply, keeper, tls=cfg.tls is not None)
        renewing = asyncio.create_task(keeper.run(), name="credential")
        try:
            await _serve_joined(
                cfg, agent, catalog, reply, options, advertise, hardware, allocation, clock
            )
        finally:
            renewing.cancel()
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
    allocation: Allocation | None = None,
    clock: Clock | None = None,
) -> None:
    pidfile = pidfile_for(cfg.site)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{os.getpid()}\n")
    stop = stop_event()
    record = lambda: site_record(cfg, agent.executor, advertise, hardware)  # noqa: E731
    keeper = asyncio.create_task(keep_registered(catalog, record, reply), name="registration")

    async def on_drain() -> None:
        print(f"edif-agent draining site={cfg.site}: the allocation ends soon", flush=True)
        await agent.stop_taking_work()

    walltime = None
    if allocation is not None:
        follow = follow_allocation(allocation, agent.front, clock or SystemClock(), on_drain)
        walltime = asyncio.create_task(follow, name="walltime")
    try:
        await _first(stop.wait(), walltime)
        # A second SIGTERM during the drain ends the process (a service manager's kill timeout).
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        if walltime is not None and walltime.done():
            walltime.result()  # a failed walltime follower fails the agent loudly
            print(f"edif-agent leaving site={cfg.site}: allocation ends", flush=True)
        else:
            print(f"edif-agent leaving site={cfg.site}: draining", flush=True)
            agent.front.start_draining()  # jobs that still arrive go back to the broker
        keeper.cancel()
        with contextlib.suppress(EdifError):  # the broker may be gone already (mesh shutdown)
            await catalog.deregister(cfg.site)
        await agent.drain(options.drain_timeout_s)
        print(f"edif-agent left site={cfg.site} unfinished_jobs={agent.busy()}", flush=True)
    finally:
        keeper.cancel()
        if walltime is not None:
            walltime.cancel()
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


async def _first(stop: Awaitable[object], walltime: asyncio.Task | None) -> None:
    """Wait for a stop signal or, with a walltime, for the allocation's drain to finish."""
    waiting = asyncio.ensure_future(stop)
    try:
        tasks = {waiting, walltime} if walltime is not None else {waiting}
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()


def _catalog_for(
    link: BrokerLink, reply: JoinReply, keeper: CredentialKeeper, tls: bool = False
) -> Catalog:
    if reply.catalog.kind == "embedded":
        return BrokerHostedCatalog(link, reply, keeper)
    # Consul's address comes from the broker; an ACL token, if any, from EDIF_CONSUL_TOKEN.
    return ConsulCatalog(ConsulSettings(addr=reply.catalog.address, grpc_tls=tls))
