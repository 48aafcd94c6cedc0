"""The behaviour every `Catalog` must show, written once and run against each implementation.

A test module subclasses `CatalogContract` (the name keeps pytest from collecting the base)
and provides a `harness` fixture: the catalog under test, how to let time pass for it (move a
fake clock and run the expiry/reaper steps, or really sleep against a real Consul), the TTL
and deregister window to register with, and what can be counted. Sites are named with the
harness's unique prefix and everything read back is filtered by it, so the suite also runs
against a shared real Consul.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from edif.errors import SiteRecordTooLarge, UnknownSite

# From the modules, not the package: under pytest `tests/registry` shadows the package root.
from registry.catalog import Catalog
from registry.model import Hardware, ModelEntry, SiteRecord, Versions

GiB = 1024**3
Snapshot = list[SiteRecord]


@dataclass
class Harness:
    catalog: Catalog
    elapse: Callable[[float], Awaitable[None]]  # let this much (catalog) time pass
    ttl_s: float
    deregister_after_s: float
    reap_slack_s: float = 0.0  # a real Consul reaps every ~30 s
    settle_s: float = 3.0  # how long a change may take to show (real Consul syncs async)
    grpc_address: str = "127.0.0.1:50051"
    prefix: str = "t-"
    exclusive: bool = True  # nobody else writes to this catalog: every yield is ours
    watch_requests: Callable[[], int] | None = None  # watch queries so far, where countable

    def site(self, name: str) -> str:
        return f"{self.prefix}{name}"

    async def register(self, record: SiteRecord) -> None:
        await self.catalog.register(record, self.ttl_s, self.deregister_after_s)

    async def mine(self) -> Snapshot:
        return [r for r in await self.catalog.snapshot() if r.site.startswith(self.prefix)]

    async def eventually(self, predicate: Callable[[Snapshot], bool]) -> Snapshot:
        """The first snapshot (ours only) that satisfies `predicate`, within `settle_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_s
        while not predicate(snapshot := await self.mine()):
            if loop.time() > deadline:
                raise AssertionError(f"catalog never got there; last snapshot: {snapshot}")
            await asyncio.sleep(0.05)
        return snapshot


def site_record(h: Harness | None, name: str, models: int = 3) -> SiteRecord:
    """A realistic record: non-ASCII institution, 8 GPUs, `models` long model keys; named
    and addressed for harness `h` (no harness: `name` as is, 127.0.0.1:50051)."""
    return SiteRecord(
        site=h.site(name) if h else name,
        institution="Friedrich-Alexander-Universität Erlangen-Nürnberg",
        grpc_address=h.grpc_address if h else "127.0.0.1:50051",
        agent_version="0.1.0",
        versions=Versions(nnsight="0.8.1", torch="2.13.0", transformers="5.22.2", python="3.11.9"),
        hardware=Hardware(
            vendor="rocm",
            device_type="AMD Instinct MI300X",
            count=8,
            free_memory_bytes=[180 * GiB + i for i in range(8)],
            total_memory_bytes=192 * GiB,
        ),
        models=[_model(i) for i in range(models)],
        allowed_groups=["fau", "eu-mi-consortium"],
        max_concurrent_jobs=4,
    )


def _model(i: int) -> ModelEntry:
    repo = f"research-lab-{i:03d}/llama-3.1-70b-instruct-interpretability-fork-{i}"
    return ModelEntry(
        model_key=f'LlamaForCausalLM:{{"repo_id": "{repo}", "revision": "{i:040x}"}}',
        repo_id=repo,
        revision=f"{i:040x}",
        task="text-generation",
        state="RUNNING" if i % 3 else "DEPLOYING",
    )


class Watcher:
    """Runs `catalog.watch()` in a task; queues each distinct list of our sites."""

    def __init__(self, catalog: Catalog, prefix: str) -> None:
        self.raw_yields = 0
        self._queue: asyncio.Queue[Snapshot] = asyncio.Queue()
        self._last: Snapshot | None = None
        self._task = asyncio.create_task(self._run(catalog, prefix))

    async def _run(self, catalog: Catalog, prefix: str) -> None:
        async for snapshot in catalog.watch():
            self.raw_yields += 1
            mine = [r for r in snapshot if r.site.startswith(prefix)]
            if mine != self._last:
                self._last = mine
                self._queue.put_nowait(mine)

    async def next(self, timeout: float = 5.0) -> Snapshot:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            if self._task.done():
                self._task.result()  # the watch died: show why
            raise

    async def until(self, predicate: Callable[[Snapshot], bool], timeout: float = 5.0) -> Snapshot:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(snapshot := await self.next(deadline - loop.time())):
            pass
        return snapshot

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def watching(h: Harness) -> AsyncIterator[Watcher]:
    watcher = Watcher(h.catalog, h.prefix)
    try:
        yield watcher
    finally:
        await watcher.close()


def sites(snapshot: Snapshot) -> list[str]:
    return [r.site for r in snapshot]


class CatalogContract:
    async def test_register_round_trips_the_record(self, harness: Harness) -> None:
        record = site_record(harness, "roundtrip", models=40)  # the model list spans parts
        await harness.register(record)
        assert await harness.eventually(lambda s: s != []) == [record]

    async def test_register_again_replaces_the_record(self, harness: Harness) -> None:
        await harness.register(site_record(harness, "again", models=2))
        newer = site_record(harness, "again", models=5)
        await harness.register(newer)
        assert await harness.eventually(lambda s: s == [newer]) == [newer]

    async def test_heartbeats_keep_a_site_passing(self, harness: Harness) -> None:
        await harness.register(site_record(harness, "beating"))
        for _ in range(4):  # 2.4 TTLs in all
            await harness.elapse(harness.ttl_s * 0.6)
            await harness.catalog.heartbeat(harness.site("beating"))
        await harness.elapse(harness.ttl_s * 0.6)
        [record] = await harness.mine()
        assert record.health == "passing"

    @pytest.mark.slow
    async def test_missing_heartbeats_turn_critical_then_remove_the_site(
        self, harness: Harness
    ) -> None:
        site = harness.site("silent")
        await harness.register(site_record(harness, "silent"))
        await harness.elapse(harness.ttl_s + 1)
        [record] = await harness.eventually(lambda s: s != [] and s[0].health == "critical")
        assert record.site == site
        await harness.elapse(harness.deregister_after_s + harness.reap_slack_s + 1)
        await harness.eventually(lambda s: s == [])
        with pytest.raises(UnknownSite):
            await harness.catalog.heartbeat(site)

    async def test_set_health_reports_and_resets_the_ttl(self, harness: Harness) -> None:
        site = harness.site("degraded")
        await harness.register(site_record(harness, "degraded"))
        await harness.elapse(harness.ttl_s * 0.6)
        await harness.catalog.set_health(site, "warning", "draining before Slurm ends")
        await harness.elapse(harness.ttl_s * 0.6)  # 1.2 TTLs since register: reset by it
        await harness.eventually(lambda s: [r.health for r in s] == ["warning"])
        await harness.catalog.set_health(site, "critical", "GPU 3 lost")
        await harness.eventually(lambda s: [r.health for r in s] == ["critical"])
        await harness.catalog.heartbeat(site)
        await harness.eventually(lambda s: [r.health for r in s] == ["passing"])

    async def test_deregister_removes_the_site(self, harness: Harness) -> None:
        site = harness.site("leaving")
        await harness.register(site_record(harness, "leaving"))
        await harness.eventually(lambda s: sites(s) == [site])
        await harness.catalog.deregister(site)
        await harness.eventually(lambda s: s == [])
        await harness.catalog.deregister(site)  # again: not an error
        with pytest.raises(UnknownSite):
            await harness.catalog.heartbeat(site)

    async def test_heartbeat_for_an_unknown_site_says_so(self, harness: Harness) -> None:
        with pytest.raises(UnknownSite):
            await harness.catalog.heartbeat(harness.site("never-registered"))
        with pytest.raises(UnknownSite):
            await harness.catalog.set_health(harness.site("never-registered"), "warning")

    async def test_a_record_over_consuls_limits_is_refused(self, harness: Harness) -> None:
        with pytest.raises(SiteRecordTooLarge):
            await harness.register(site_record(harness, "huge", models=400))
        assert await harness.mine() == []

    async def test_watch_yields_at_start_and_on_every_change(self, harness: Harness) -> None:
        site = harness.site("watched")
        record = site_record(harness, "watched", models=30)
        async with watching(harness) as watcher:
            assert await watcher.next() == []
            await harness.register(record)
            assert await watcher.until(lambda s: s != []) == [record]
            await harness.catalog.set_health(site, "warning", "loading a model")
            await watcher.until(lambda s: [r.health for r in s] == ["warning"])
            await harness.elapse(harness.ttl_s + 1)  # no heartbeat: TTL runs out
            await watcher.until(lambda s: [r.health for r in s] == ["critical"])
            await harness.catalog.deregister(site)
            assert await watcher.until(lambda s: s == []) == []

    async def test_an_idle_watch_stays_quiet(self, harness: Harness) -> None:
        await harness.register(site_record(harness, "idle"))
        async with watching(harness) as watcher:
            await watcher.until(lambda s: s != [])
            await asyncio.sleep(0.2)  # let the watch settle into its next wait
            yields = watcher.raw_yields
            queries = harness.watch_requests() if harness.watch_requests else 0
            await asyncio.sleep(1.5)
            if harness.exclusive:
                assert watcher.raw_yields == yields, "a watch yielded with nothing changed"
            if harness.watch_requests:
                assert harness.watch_requests() - queries <= 1, "the watch polls"
            await harness.catalog.heartbeat(harness.site("idle"))  # passing → passing
            await asyncio.sleep(0.3)
            if harness.exclusive:
                assert watcher.raw_yields == yields, "a no-change heartbeat woke the watch"
