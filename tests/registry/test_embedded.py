"""EmbeddedCatalog: the shared catalog contract on a fake clock, and what is its own."""

from __future__ import annotations

import asyncio

import pytest
from catalog_suite import CatalogContract, Harness, site_record, watching

from edif.clock import FakeClock
from edif.errors import BadRequest
from registry.catalog import Catalog
from registry.embedded import EmbeddedCatalog


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def harness(clock: FakeClock):
    catalog = EmbeddedCatalog(clock, tick_s=0.05)

    async def elapse(seconds: float) -> None:
        clock.advance(seconds)
        catalog.tick()

    yield Harness(catalog, elapse, ttl_s=15.0, deregister_after_s=60.0)
    await catalog.aclose()


class TestEmbeddedCatalog(CatalogContract):
    pass


def test_it_is_a_catalog() -> None:
    assert isinstance(EmbeddedCatalog(FakeClock()), Catalog)


async def test_expiry_dates_from_the_last_heartbeat_not_from_the_tick(
    harness: Harness, clock: FakeClock
) -> None:
    await harness.register(site_record(harness, "edge"))
    clock.advance(15.0)  # exactly the TTL: still fine
    assert [r.health for r in await harness.mine()] == ["passing"]
    clock.advance(0.5)
    assert [r.health for r in await harness.mine()] == ["critical"]
    clock.advance(60.0)  # critical since t=15: 60.5 s > 60 s
    assert await harness.mine() == []


async def test_a_running_watch_notices_expiry_by_itself(harness: Harness, clock: FakeClock) -> None:
    await harness.register(site_record(harness, "unattended"))
    async with watching(harness) as watcher:
        await watcher.until(lambda s: s != [])
        clock.advance(16.0)  # nobody calls tick(): the watch's own tick must see it
        await watcher.until(lambda s: [r.health for r in s] == ["critical"], timeout=2.0)


async def test_no_one_minute_floor_on_the_deregister_window(
    harness: Harness, clock: FakeClock
) -> None:
    await harness.catalog.register(site_record(harness, "brief"), ttl_s=2.0, deregister_after_s=3.0)
    clock.advance(2.5)
    assert [r.health for r in await harness.mine()] == ["critical"]
    clock.advance(3.0)
    assert await harness.mine() == []


async def test_the_health_an_agent_claims_is_ignored(harness: Harness) -> None:
    claimed = site_record(harness, "boastful").with_health("critical")
    await harness.register(claimed)
    assert [r.health for r in await harness.mine()] == ["passing"]


async def test_a_note_only_change_does_not_wake_watchers(harness: Harness) -> None:
    site = harness.site("chatty")
    await harness.register(site_record(harness, "chatty"))
    await harness.catalog.set_health(site, "warning", "loading 1/2")
    async with watching(harness) as watcher:
        await watcher.until(lambda s: s != [])
        yields = watcher.raw_yields
        await harness.catalog.set_health(site, "warning", "loading 2/2")
        await asyncio.sleep(0.2)
        assert watcher.raw_yields == yields


@pytest.mark.parametrize(("ttl_s", "after_s"), [(0.0, 60.0), (10.0, 0.0), (-1.0, 60.0)])
async def test_nonsense_windows_are_refused(harness: Harness, ttl_s: float, after_s: float) -> None:
    with pytest.raises(BadRequest):
        await harness.catalog.register(site_record(harness, "odd"), ttl_s, after_s)
