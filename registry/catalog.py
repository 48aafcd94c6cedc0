"""The `Catalog` interface: where site agents announce themselves and the broker finds them.

Flow, agent side: `register` once its gRPC server is serving (the registration starts
passing), then `heartbeat` well within `ttl_s` (every ttl/3 is the usual choice);
`set_health` reports a degraded or failing state in between (it resets the TTL as a
heartbeat does, and the next `heartbeat` reports passing again); `deregister` on a clean
shutdown. A site that stops heartbeating turns critical after `ttl_s` and is removed once it
has been critical for `deregister_after_s`; its next `heartbeat` then raises `UnknownSite`
and the agent registers again.

Flow, broker side: `watch()` yields the full list of registered sites (healthy and not,
`SiteRecord.health` set) once at start and again after every change; it never yields the same
list twice in a row and never polls in a loop (the Consul implementation uses blocking
queries). `snapshot()` is the same list, once.

Implementations: `EmbeddedCatalog` (in the broker's process, one machine) and
`ConsulCatalog` (a Consul cluster, federation).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from registry.model import Health, SiteRecord


@runtime_checkable
class Catalog(Protocol):
    async def register(self, record: SiteRecord, ttl_s: float, deregister_after_s: float) -> None:
        """Add or replace the site's entry; it starts passing."""
        ...

    async def heartbeat(self, site: str) -> None:
        """The site is alive and well (TTL pass). `UnknownSite` if it is not registered."""
        ...

    async def set_health(self, site: str, status: Health, note: str = "") -> None:
        """Report the site's own status with a note for operators; also resets the TTL."""
        ...

    async def deregister(self, site: str) -> None:
        """Remove the site's entry; removing an absent site is not an error."""
        ...

    def watch(self) -> AsyncIterator[list[SiteRecord]]:
        """Snapshots (sorted by site name) at start and after every change, until cancelled."""
        ...

    async def snapshot(self) -> list[SiteRecord]:
        """All registered sites now, sorted by site name."""
        ...

    async def aclose(self) -> None:
        """Release connections; the catalog is not used afterwards."""
        ...
