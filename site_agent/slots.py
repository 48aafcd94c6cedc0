"""A model slot: one configured model, its worker, its FIFO of jobs and its health.

States are an enum with the transitions in one table. A slot runs one job at a time (the
worker is single-threaded by design); jobs wait in arrival order. When a job overruns its
time limit, is cancelled while running, or its worker dies, the worker is killed and a
replacement started; jobs behind it wait for the replacement instead of failing.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from site_agent.config import ModelConfig

log = logging.getLogger("edif.agent.slot")


class SlotState(enum.StrEnum):
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"


_TRANSITIONS: dict[SlotState, set[SlotState]] = {
    SlotState.NOT_STARTED: {SlotState.DEPLOYING},
    SlotState.DEPLOYING: {SlotState.RUNNING, SlotState.UNHEALTHY},
    SlotState.RUNNING: {SlotState.DEPLOYING, SlotState.UNHEALTHY},
    SlotState.UNHEALTHY: {SlotState.DEPLOYING},
}


class WorkerDied(Exception):
    """The worker process is gone (killed, crashed, out of memory)."""


class WorkerHandle(Protocol):
    def execute(self, payload: bytes, compress: bool, env_json: str) -> AsyncIterator[tuple]: ...

    def kill(self) -> None: ...


class WorkerFactory(Protocol):
    async def start(self, cfg: ModelConfig) -> WorkerHandle:
        """Start a worker and return once its model is loaded."""
        ...


class ModelSlot:
    def __init__(self, cfg: ModelConfig, factory: WorkerFactory) -> None:
        self.cfg = cfg
        self.factory = factory
        self.state = SlotState.NOT_STARTED
        self.handle: WorkerHandle | None = None
        self.lock = asyncio.Lock()  # FIFO: asyncio.Lock wakes waiters in arrival order
        self.waiting: list[str] = []
        self.running: str | None = None
        self.recent_execution_s = 0.0
        self.last_error = ""
        self._ready = asyncio.Event()
        self._starting: asyncio.Task | None = None

    def _move(self, new: SlotState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"slot {self.cfg.repo_id}: illegal {self.state} -> {new}")
        self.state = new

    @property
    def queue_depth(self) -> int:
        return len(self.waiting) + (1 if self.running else 0)

    def start(self) -> asyncio.Task:
        """Start (or restart) the worker in the background; jobs wait for `ready()`."""
        self._ready.clear()
        self._move(SlotState.DEPLOYING)
        self._starting = asyncio.create_task(self._start())
        return self._starting

    async def _start(self) -> None:
        try:
            self.handle = await self.factory.start(self.cfg)
        except Exception as exc:  # noqa: BLE001 - reported through state and Describe
            log.error("model %s failed to load: %s", self.cfg.repo_id, exc)
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._move(SlotState.UNHEALTHY)
        else:
            self._move(SlotState.RUNNING)
        finally:
            self._ready.set()

    async def ready(self) -> bool:
        await self._ready.wait()
        return self.state is SlotState.RUNNING

    def replace(self) -> None:
        """Kill the current worker (if any) and start a fresh one."""
        if self.handle is not None:
            self.handle.kill()
            self.handle = None
        if self.state is not SlotState.DEPLOYING:
            self.start()

    def record_execution(self, seconds: float) -> None:
        # Exponential moving average: recent jobs predict the wait for the next ones.
        alpha = 0.3
        prev = self.recent_execution_s
        self.recent_execution_s = seconds if prev == 0 else alpha * seconds + (1 - alpha) * prev
