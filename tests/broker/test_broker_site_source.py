"""The broker's site list from a live catalog: sites appear, turn critical and disappear."""

from __future__ import annotations

import asyncio

from broker_fakes import GPT2_KEY, SITES, FakeSiteClient, describe

from broker.catalog import SiteCatalog
from broker.service_info import status_document
from broker.site_source import CatalogSites, StaticSites
from edif.clock import FakeClock
from registry.embedded import EmbeddedCatalog
from registry.model import Hardware, SiteRecord, Versions

TTL_S, WINDOW_S = 3.0, 10.0


def record(site: str, address: str = "127.0.0.1:7") -> SiteRecord:
    return SiteRecord(
        site=site,
        institution="x",
        grpc_address=address,
        agent_version="0",
        versions=Versions(nnsight="0.8.1", torch="2", transformers="5", python="3.11"),
        hardware=Hardware(vendor="cpu", device_type="cpu", count=1),
    )


def states(catalog: SiteCatalog) -> dict[str, str]:
    reachable = {v.name: v.reachable for v in catalog.views()}
    document = status_document(catalog.descriptions(), reachable)["deployments"]
    return {name: entry["application_state"] for name, entry in document.items()}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_sites_follow_the_embedded_catalog() -> None:
    clock = FakeClock()
    registry = EmbeddedCatalog(clock, tick_s=3600)  # the test ticks by hand
    sites = FakeSiteClient({"site-x": describe("site-x", GPT2_KEY)})
    moved: list[dict[str, str]] = []
    catalog = SiteCatalog(
        [],
        sites,
        refresh_s=3600,
        startup_wait_s=1.0,
        source=CatalogSites(registry),
        on_addresses=lambda addresses: moved.append(dict(addresses)),
    )
    await catalog.wait_ready()
    assert catalog.views() == []
    runner = asyncio.create_task(catalog.run())
    try:
        await registry.register(record("site-x"), TTL_S, WINDOW_S)
        await settle()
        assert [v.name for v in catalog.views() if v.reachable] == ["site-x"]
        assert moved[-1] == {"site-x": "127.0.0.1:7"}
        assert states(catalog) == {"site-x/openai-community/gpt2": "RUNNING"}

        clock.advance(TTL_S + 0.1)  # missed heartbeats: critical, listed but no work
        registry.tick()
        await settle()
        assert [v.reachable for v in catalog.views()] == [False]
        assert states(catalog) == {"site-x/openai-community/gpt2": "UNHEALTHY"}
        await catalog.refresh()  # Describe still answers, but the catalog has the say
        assert [v.reachable for v in catalog.views()] == [False]

        await registry.heartbeat("site-x")  # back (before the deregister window)
        await settle()
        assert [v.reachable for v in catalog.views()] == [True]

        clock.advance(TTL_S + WINDOW_S + 1)  # critical past the window: reaped
        registry.tick()
        await settle()
        assert catalog.views() == [] and states(catalog) == {}
        assert moved[-1] == {}
    finally:
        runner.cancel()


async def test_static_sites_stay_and_win_over_the_catalog() -> None:
    registry = EmbeddedCatalog(FakeClock(), tick_s=3600)
    sites = FakeSiteClient(
        {"site-a": describe("site-a", GPT2_KEY), "site-b": describe("site-b"), "x": describe("x")}
    )
    catalog = SiteCatalog(SITES, sites, source=CatalogSites(registry))
    await registry.register(record("site-a", "10.0.0.1:9"), TTL_S, WINDOW_S)
    await registry.register(record("x"), TTL_S, WINDOW_S)
    await catalog.wait_ready()
    assert [v.name for v in catalog.views()] == ["site-a", "site-b", "x"]
    await registry.deregister("x")
    await registry.deregister("site-a")
    await settle()
    assert [v.name for v in catalog.views()] == ["site-a", "site-b"]


async def test_static_source_yields_its_list_once() -> None:
    watch = StaticSites(SITES).watch()
    assert [s.name for s in await anext(watch)] == ["site-a", "site-b"]
    blocked = asyncio.create_task(anext(watch))
    await settle()
    assert not blocked.done()
    blocked.cancel()
