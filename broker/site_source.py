"""Where the broker's list of sites comes from: a static sites file, or a live site catalog.

Role: `SiteCatalog` (Describe polling, routing views) asks a `SiteSource` which sites exist;
the source only names sites and their addresses, Describe says what they host.

Flow: `watch()` yields the full list of `SourcedSite`s at start and again after every change.
`StaticSites` yields its sites file once and then waits forever. `CatalogSites` follows a
`registry.Catalog` (`EmbeddedCatalog` in the broker's process, or `ConsulCatalog`): every
registered site is listed with its catalog health; a site whose health is critical (missed
heartbeats, failing gRPC probe) stays listed but gets no work, and a site the catalog removed
(left, or reaped after its deregister window) disappears.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.config import SiteEntry
from registry.catalog import Catalog
from registry.model import SiteRecord


@dataclass(frozen=True)
class SourcedSite:
    name: str
    address: str  # host:port of the agent's gRPC endpoint
    healthy: bool = True  # False: the catalog says critical; keep it listed, route nothing


class SiteSource(Protocol):
    def watch(self) -> AsyncIterator[list[SourcedSite]]:
        """The current sites at start and after every change, until cancelled."""
        ...


class StaticSites:
    """The sites file: a list that never changes while the broker runs."""

    def __init__(self, entries: Sequence[SiteEntry]) -> None:
        self._sites = [SourcedSite(e.name, e.address) for e in entries]

    async def watch(self) -> AsyncIterator[list[SourcedSite]]:
        yield list(self._sites)
        await asyncio.Event().wait()  # nothing will ever change


class CatalogSites:
    """The sites a `Catalog` lists, as their health changes."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    async def watch(self) -> AsyncIterator[list[SourcedSite]]:
        async for records in self.catalog.watch():
            yield [sourced(record) for record in records]


def sourced(record: SiteRecord) -> SourcedSite:
    return SourcedSite(record.site, record.grpc_address, record.health != "critical")
