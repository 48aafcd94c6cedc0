"""Running retention inside the broker: compact at start-up, then once an hour.

`with_retention(lifespan, log, retention_s)` wraps the app's lifespan with a background task
that calls `log.compact(retention_s)` (in a thread: compaction may touch many rows) and stops
it on shutdown. A failing compaction is logged and retried next period; the log stays valid.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress

from fastapi import FastAPI

from broker.audit.store import SqliteAuditLog

log = logging.getLogger(__name__)

PERIOD_S = 3600.0

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


async def run_retention(audit: SqliteAuditLog, retention_s: float, period_s: float) -> None:
    while True:
        try:
            entry = await asyncio.to_thread(audit.compact, retention_s)
            if entry is not None:
                log.info(
                    "audit: compacted %s expired entries into %s accounting rows (seq %d)",
                    entry.data.get("removed"),
                    entry.data.get("rows"),
                    entry.seq,
                )
        except Exception:
            log.exception("audit: retention compaction failed; retrying in %.0f s", period_s)
        await asyncio.sleep(period_s)


def with_retention(
    lifespan: Lifespan, audit: SqliteAuditLog, retention_s: float, period_s: float = PERIOD_S
) -> Lifespan:
    @asynccontextmanager
    async def wrapped(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(run_retention(audit, retention_s, period_s), name="audit")
        try:
            async with lifespan(app):
                yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            audit.close()

    return wrapped
