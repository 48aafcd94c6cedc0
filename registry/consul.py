"""`ConsulCatalog`: the site catalog on a Consul cluster, for the federation.

Agent side: each site registers, with the Consul agent it talks to, a service `edif-site`
with ID `edif-site-<site>`, the gRPC host and port as its address, tags `[<site>, "edif"]`,
the `SiteRecord` as service Meta (`registry.meta`) and two checks, both with
`DeregisterCriticalServiceAfter`:

- `edif-site-<site>:ttl`, a TTL check: `heartbeat` is `agent.check.ttl_pass`, `set_health` is
  pass/warn/fail with a note. It starts passing (an agent registers once it serves).
- `edif-site-<site>:grpc`, a gRPC health probe Consul runs every `grpc_interval_s` (no TLS),
  so a hung agent whose heartbeat thread still runs is caught too. It also starts passing;
  the first probe corrects it within one interval.

Heartbeats and deregistration must go to the same Consul agent that took the registration
(agent endpoints are local to an agent). Consul raises a deregister window under one minute to
one minute and reaps every ~30 s.

Broker side: `watch()` runs blocking queries on `/v1/health/service/edif-site` (`index` =
the last `X-Consul-Index`, `wait` = `wait_s`), yields only when the decoded list changed
(a blocking query may return with no change), resets the index to 0 when it goes backwards
(snapshot restore, leader change) and keeps it at least 1, leaves at least
`min_query_interval_s` between queries, and retries errors with exponential backoff. A site's
health is the worst status among all its checks (node checks included). Entries whose Meta
does not decode are skipped and logged.

Settings come from `EDIF_CONSUL_*` (`ConsulSettings`); the token is sent as a header and
never logged.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from consul import ConsulException
from consul.exceptions import ACLDisabled, ACLPermissionDenied
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from edif.errors import (
    BadRequest,
    CatalogUnavailable,
    ConfigError,
    SiteRecordUnreadable,
    UnknownSite,
)
from registry.consul_http import AsyncConsul
from registry.durations import go_duration
from registry.model import HEALTH_ORDER, Health, SiteRecord, split_address, worst_health

log = logging.getLogger(__name__)

SERVICE = "edif-site"
TAG = "edif"
_T = TypeVar("_T")

# Consul's answers for a check it does not know (newer: 404, older: 500 with this text).
_UNKNOWN_CHECK = ("does not have associated TTL", "Unknown check ID")


class ConsulSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDIF_CONSUL_", extra="ignore")

    addr: str | None = None  # EDIF_CONSUL_ADDR, e.g. http://127.0.0.1:8500; unset: no Consul
    token: SecretStr | None = None  # EDIF_CONSUL_TOKEN, an ACL token
    ca_file: Path | None = None  # EDIF_CONSUL_CA_FILE, for an https address with a private CA
    wait_s: float = Field(default=30.0, gt=0, le=600)  # blocking query wait (Consul max 10m)
    grpc_interval_s: float = Field(default=10.0, gt=0)
    grpc_timeout_s: float = Field(default=5.0, gt=0)
    request_timeout_s: float = Field(default=10.0, gt=0)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    min_query_interval_s: float = Field(default=0.1, ge=0)
    # The agent serves gRPC over TLS (site YAML `tls:`): Consul's probe then speaks TLS too,
    # without verifying the certificate (it checks liveness; the broker verifies identity).
    grpc_tls: bool = False


def service_id(site: str) -> str:
    return f"{SERVICE}-{site}"


def ttl_check_id(site: str) -> str:
    return f"{service_id(site)}:ttl"


def grpc_check_id(site: str) -> str:
    return f"{service_id(site)}:grpc"


class ConsulCatalog:
    def __init__(self, settings: ConsulSettings) -> None:
        if not settings.addr:
            raise ConfigError("set EDIF_CONSUL_ADDR (e.g. http://127.0.0.1:8500) to use Consul")
        self._settings = settings
        self._consul = _client_for(settings)

    async def register(self, record: SiteRecord, ttl_s: float, deregister_after_s: float) -> None:
        if ttl_s <= 0 or deregister_after_s <= 0:
            raise BadRequest("ttl_s and deregister_after_s must be positive")
        host, port = split_address(record.grpc_address)
        ttl, grpc = self._checks(record, ttl_s, deregister_after_s)
        register = self._consul.agent.service.register(
            SERVICE,
            service_id=service_id(record.site),
            address=host,
            port=port,
            tags=[record.site, TAG],
            meta=record.to_meta(),
            check=ttl,
            extra_checks=[grpc],
            replace_existing_checks=True,  # re-registering is idempotent
        )
        if not await self._call(register, f"register site {record.site!r}"):
            raise CatalogUnavailable(f"Consul did not accept the registration of {record.site!r}")

    async def heartbeat(self, site: str) -> None:
        await self.set_health(site, "passing")

    async def set_health(self, site: str, status: Health, note: str = "") -> None:
        checks = self._consul.agent.check
        update = {
            "passing": checks.ttl_pass,
            "warning": checks.ttl_warn,
            "critical": checks.ttl_fail,
        }
        try:
            call = update[status](ttl_check_id(site), note or None)
            found = await self._call(call, f"mark site {site!r} {status}")
        except CatalogUnavailable as err:
            if any(text in err.message for text in _UNKNOWN_CHECK):
                found = False
            else:
                raise
        if not found:  # py-consul answers False on a 404
            raise UnknownSite(f"site {site!r} is not registered with this Consul agent")

    async def deregister(self, site: str) -> None:
        # False (a 404) means it was already gone: fine.
        await self._call(self._consul.agent.service.deregister(service_id(site)), "deregister")

    async def snapshot(self) -> list[SiteRecord]:
        _, entries = await self._query(0)
        return _records(entries)

    async def watch(self) -> AsyncIterator[list[SiteRecord]]:
        index, backoff, last = 0, self._settings.backoff_initial_s, None
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                new_index, entries = await self._query(index)
            except CatalogUnavailable as err:
                log.warning("catalog watch: %s; retrying in %.1f s", err.message, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._settings.backoff_max_s)
                continue
            backoff = self._settings.backoff_initial_s
            records = _records(entries)
            if records != last:
                last = records
                yield records
            index = next_index(index, new_index)
            spent = loop.time() - started
            await asyncio.sleep(max(0.0, self._settings.min_query_interval_s - spent))

    async def aclose(self) -> None:
        await self._consul.http.close()

    def _checks(
        self, record: SiteRecord, ttl_s: float, deregister_after_s: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        deregister = go_duration(deregister_after_s)
        ttl = {
            "CheckID": ttl_check_id(record.site),
            "Name": "eDIF agent heartbeat",
            "TTL": go_duration(ttl_s),
            "Status": "passing",
            "DeregisterCriticalServiceAfter": deregister,
        }
        grpc = {
            "CheckID": grpc_check_id(record.site),
            "Name": "eDIF agent gRPC health",
            "GRPC": record.grpc_address,
            "GRPCUseTLS": self._settings.grpc_tls,
            "TLSSkipVerify": self._settings.grpc_tls,
            "Interval": go_duration(self._settings.grpc_interval_s),
            "Timeout": go_duration(self._settings.grpc_timeout_s),
            "Status": "passing",
            "DeregisterCriticalServiceAfter": deregister,
        }
        return ttl, grpc

    async def _query(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        query = self._consul.health.service(
            SERVICE, index=index or None, wait=go_duration(self._settings.wait_s)
        )
        raw_index, entries = await self._call(query, "list sites")
        try:
            return int(raw_index), list(entries or [])
        except (TypeError, ValueError) as err:
            raise CatalogUnavailable(f"Consul sent index {raw_index!r}: {err}") from err

    async def _call(self, call: Awaitable[_T], what: str) -> _T:
        try:
            return await call
        except (ACLPermissionDenied, ACLDisabled) as err:
            raise CatalogUnavailable(
                f"Consul refused to {what} (ACL: {err}); check EDIF_CONSUL_TOKEN"
            ) from err
        except (ConsulException, httpx.HTTPError) as err:
            detail = str(err) or type(err).__name__
            raise CatalogUnavailable(
                f"Consul at {self._settings.addr} could not {what}: {detail}"
            ) from err


def next_index(previous: int, returned: int) -> int:
    """Consul's rules for the next blocking query: reset to 0 when the index went backwards,
    never block on an index below 1 (that returns at once: a hot loop)."""
    if returned < previous:
        return 0
    return max(returned, 1)


def _records(entries: list[dict[str, Any]]) -> list[SiteRecord]:
    """Decoded, one per site (the healthiest if a site shows up twice), sorted by site."""
    best: dict[str, SiteRecord] = {}
    for entry in entries:
        record = _record(entry)
        if record is None:
            continue
        kept = best.get(record.site)
        if kept is None or HEALTH_ORDER[record.health] < HEALTH_ORDER[kept.health]:
            best[record.site] = record
    return [best[site] for site in sorted(best)]


def _record(entry: dict[str, Any]) -> SiteRecord | None:
    service = entry.get("Service") or {}
    health = worst_health([check.get("Status", "") for check in entry.get("Checks") or []])
    try:
        record = SiteRecord.from_meta(service.get("Meta") or {}, health)
    except SiteRecordUnreadable as err:
        log.warning("catalog entry %s skipped: %s", service.get("ID"), err.message)
        return None
    if service.get("ID") != service_id(record.site):  # another writer claiming the site
        log.warning("catalog entry %s claims site %r; skipped", service.get("ID"), record.site)
        return None
    return record


def _client_for(settings: ConsulSettings) -> AsyncConsul:
    url = urllib.parse.urlsplit(settings.addr or "")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"EDIF_CONSUL_ADDR {settings.addr!r} must look like http://host:8500")
    # Host, port, scheme and verify are all given so py-consul reads no CONSUL_HTTP_* variable.
    consul = AsyncConsul(
        host=url.hostname,
        port=url.port or 8500,
        scheme=url.scheme,
        verify=str(settings.ca_file) if settings.ca_file else True,
        request_timeout_s=settings.request_timeout_s,
    )
    # py-consul prefers $CONSUL_HTTP_TOKEN over the token it is given; the settings are the
    # one source of configuration here, so set it after construction.
    consul.token = settings.token.get_secret_value() if settings.token else None
    return consul
