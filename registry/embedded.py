"""`EmbeddedCatalog`: the site catalog in the broker's own process, for one machine.

Used where no Consul runs (`edif up --demo`, tests): the broker creates it and hands it to the
in-process demo agents, so no extra service is needed. There is deliberately no way for
separate processes to share it (no HTTP, no file): agents in other processes need Consul, or
later a small catalog endpoint on the broker.

Flow: every entry carries one TTL `CheckState` (the same rules the fake Consul applies), aged by
the injected `Clock`. `tick()` applies them: a site not heard from for `ttl_s` turns critical,
and one critical for longer than `deregister_after_s` is removed. Unlike Consul there is no
1-minute floor on that window and no 30 s reaper granularity. Reads (`snapshot`, `watch`)
tick first, and a running `watch` also ticks every `tick_s` seconds of real time, so expiry
is noticed without anyone calling; tests with a `FakeClock` call `tick()` after `advance()`.
Every visible change bumps a version and wakes the watchers through an `asyncio.Event`.

Not thread-safe: use it from the event loop that runs the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from edif.clock import Clock, SystemClock
from edif.errors import BadRequest, UnknownSite
from registry.model import Health, SiteRecord
from registry.ttl import CheckState


@dataclass
class _Entry:
    record: SiteRecord
    check: CheckState


class EmbeddedCatalog:
    def __init__(self, clock: Clock | None = None, tick_s: float = 1.0) -> None:
        self._clock = clock or SystemClock()
        self._tick_s = tick_s
        self._entries: dict[str, _Entry] = {}
        self._version = 0
        self._changed = asyncio.Event()

    async def register(self, record: SiteRecord, ttl_s: float, deregister_after_s: float) -> None:
        if ttl_s <= 0 or deregister_after_s <= 0:
            raise BadRequest("ttl_s and deregister_after_s must be positive")
        record.to_meta()  # Consul's size limits here too: a site that fits here fits there
        check = CheckState("passing", "", self._now(), ttl_s, deregister_after_s)
        self._entries[record.site] = _Entry(record, check)
        self._bump()

    async def heartbeat(self, site: str) -> None:
        await self.set_health(site, "passing", "")

    async def set_health(self, site: str, status: Health, note: str = "") -> None:
        self.tick()  # a site past its deregister window is gone, as in Consul
        entry = self._entries.get(site)
        if entry is None:
            raise UnknownSite(f"site {site!r} is not registered in the catalog")
        if entry.check.update(status, note, self._now()):
            self._bump()

    async def deregister(self, site: str) -> None:
        if self._entries.pop(site, None) is not None:
            self._bump()

    async def snapshot(self) -> list[SiteRecord]:
        self.tick()
        return self._records()

    async def watch(self) -> AsyncIterator[list[SiteRecord]]:
        last: list[SiteRecord] | None = None
        while True:
            self.tick()
            seen = self._version
            records = self._records()
            if records != last:  # a note-only change bumps the version but not the list
                last = records
                yield records
            await self._changed_since(seen)

    async def aclose(self) -> None:
        """Nothing to release: the catalog is plain memory."""

    def tick(self) -> None:
        """Apply TTL expiry and the deregister window now."""
        now = self._now()
        changed = False
        for site, entry in list(self._entries.items()):
            changed |= entry.check.expire(now)
            if entry.check.reapable(now):
                del self._entries[site]
                changed = True
        if changed:
            self._bump()

    def _records(self) -> list[SiteRecord]:
        return [
            self._entries[site].record.with_health(self._entries[site].check.status)
            for site in sorted(self._entries)
        ]

    async def _changed_since(self, version: int) -> None:
        if self._version != version:
            return
        with contextlib.suppress(TimeoutError):  # a timeout just means: time to tick
            await asyncio.wait_for(self._changed.wait(), self._tick_s)

    def _bump(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _now(self) -> float:
        return self._clock.monotonic()
