"""The Executor: what the gRPC servicer talks to (describe, execute, cancel).

`PoolExecutor` keeps one `ModelSlot` per configured model and turns each job into a stream
of `ExecuteUpdate` messages: QUEUED (with position) if it has to wait for the model's worker,
RUNNING, LOG lines, the result in chunks and ResultEnd, or exactly one JobError. Time limits
and cancellation kill the worker and start a replacement; the job ends with an error that
says what happened and whether retrying makes sense. Workers come from a `WorkerFactory`
(Ray actors in production, fakes in unit tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import platform
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Protocol

from proto import site_agent_pb2 as pb
from proto.chunks import ChunkUpdate
from site_agent.config import SiteConfig
from site_agent.hardware import DetectedHardware
from site_agent.slots import ModelSlot, SlotState, WorkerDied, WorkerFactory

_PHASES = {"QUEUED": pb.QUEUED, "RUNNING": pb.RUNNING}


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    model_key: str
    payload: bytes
    compress: bool
    env_json: str = "{}"
    time_limit_s: float = 0.0


class Executor(Protocol):
    def describe(self) -> pb.SiteDescription: ...

    def execute(self, job: JobSpec) -> AsyncIterator[pb.ExecuteUpdate]: ...

    async def cancel(self, job_id: str) -> bool: ...


def _error(kind: int, text: str) -> pb.ExecuteUpdate:
    return pb.ExecuteUpdate(error=pb.JobError(kind=kind, description=text))


def _status(phase: str, text: str, position: int = 0) -> pb.ExecuteUpdate:
    return pb.ExecuteUpdate(
        status=pb.StatusUpdate(phase=_PHASES[phase], description=text, position=position)
    )


@dataclass
class _Ticket:
    cancelled: bool = False
    slot: ModelSlot | None = None
    running: bool = False


def versions() -> dict[str, str]:
    found = {name: metadata.version(name) for name in ("nnsight", "torch", "transformers")}
    found["python"] = platform.python_version()
    found["edif"] = metadata.version("edif-mesh")
    return found


@dataclass
class PoolExecutor:
    config: SiteConfig
    factory: WorkerFactory
    hardware: DetectedHardware
    slots: dict[str, ModelSlot] = field(init=False)
    _tickets: dict[str, _Ticket] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.slots = {m.model_key: ModelSlot(m, self.factory) for m in self.config.models}
        self._versions = versions()

    async def start(self) -> None:
        """Start every worker; returns when all have loaded (or failed to)."""
        await asyncio.gather(*(slot.start() for slot in self.slots.values()))

    def describe(self) -> pb.SiteDescription:
        hw = self.hardware
        return pb.SiteDescription(
            site=self.config.site,
            institution=self.config.institution,
            models=[self._deployment(s) for s in self.slots.values()],
            versions=self._versions,
            hardware=pb.Hardware(
                vendor=hw.vendor,
                device_type=hw.device_type,
                count=hw.count,
                memory_bytes=hw.memory_bytes,
            ),
            capacity=len(self.slots),
            allowed_groups=self.config.access.allowed_groups,
            max_concurrent_jobs=self.config.access.max_concurrent_jobs or len(self.slots),
            policy=_policy(self.config),
        )

    @staticmethod
    def _deployment(slot: ModelSlot) -> pb.ModelDeployment:
        cfg = slot.cfg
        return pb.ModelDeployment(
            model_key=cfg.model_key,
            repo_id=cfg.repo_id,
            revision=cfg.revision or "",
            task=cfg.task,
            state=slot.state.value,
            queue_depth=slot.queue_depth,
            recent_execution_s=slot.recent_execution_s,
        )

    async def cancel(self, job_id: str) -> bool:
        ticket = self._tickets.get(job_id)
        if ticket is None:
            return False
        ticket.cancelled = True
        if ticket.running and ticket.slot is not None:
            ticket.slot.replace()  # kills the worker: its stream raises WorkerDied
        return True

    async def execute(self, job: JobSpec) -> AsyncIterator[pb.ExecuteUpdate]:
        slot = self.slots.get(job.model_key)
        if slot is None:
            yield _error(pb.REFUSED, f"site {self.config.site} does not host {job.model_key}")
            return
        if len(slot.waiting) >= self.config.limits.max_queue_per_model:
            yield _error(
                pb.WORKER_LOST,
                f"site {self.config.site}: queue for "
                f"{slot.cfg.repo_id} is full; retry elsewhere or later",
            )
            return
        ticket = self._tickets.setdefault(job.job_id, _Ticket(slot=slot))
        try:
            async for update in self._run_in_slot(slot, job, ticket):
                yield update
        finally:
            self._tickets.pop(job.job_id, None)

    async def _run_in_slot(
        self, slot: ModelSlot, job: JobSpec, ticket: _Ticket
    ) -> AsyncIterator[pb.ExecuteUpdate]:
        # Only a job that has to wait (for another job, or for its worker to come up) hears
        # QUEUED: for one the worker takes at once it would be a status shown for a
        # millisecond, and a message to the broker and a frame to the client on every job.
        waits = slot.lock.locked() or bool(slot.waiting) or slot.state is not SlotState.RUNNING
        slot.waiting.append(job.job_id)
        if waits:
            position = len(slot.waiting) - 1 + (1 if slot.running else 0)
            text = f"waiting for {slot.cfg.repo_id} at {self.config.site}"
            yield _status("QUEUED", text, position)
        try:
            await slot.lock.acquire()
        finally:
            slot.waiting.remove(job.job_id)
        try:
            if ticket.cancelled:
                yield _error(pb.CANCELLED, "job cancelled before it started")
                return
            if not await slot.ready():
                yield _error(
                    pb.WORKER_LOST,
                    f"{slot.cfg.repo_id} is not loaded at {self.config.site}: {slot.last_error}",
                )
                return
            slot.running, ticket.running = job.job_id, True
            async for update in self._stream_worker(slot, job, ticket):
                yield update
        finally:
            slot.running, ticket.running = None, False
            slot.lock.release()

    async def _stream_worker(
        self, slot: ModelSlot, job: JobSpec, ticket: _Ticket
    ) -> AsyncIterator[pb.ExecuteUpdate]:
        limit = _effective_limit(job.time_limit_s, self.config.limits.execution_time_s)
        started = time.monotonic()
        deadline = started + limit
        assert slot.handle is not None
        stream = aiter(slot.handle.execute(job.payload, job.compress, job.env_json))
        try:
            while True:
                try:
                    item = await asyncio.wait_for(anext(stream), deadline - time.monotonic())
                except StopAsyncIteration:
                    return
                if item[0] == "done" and len(item) > 2:  # the result's last chunk rode along
                    yield ChunkUpdate(item[2])
                update = _translate(item)
                if update.HasField("done"):
                    slot.record_execution(time.monotonic() - started)
                if update.HasField("error") and len(item) > 3 and item[3]:
                    # The job changed state shared with later jobs (worker.py). Replace before
                    # yielding: the caller may close this stream as soon as it sees the error.
                    slot.replace()
                yield update
                if update.HasField("done") or update.HasField("error"):
                    return
        except TimeoutError:
            slot.replace()
            yield _error(
                pb.TIMEOUT,
                f"the job exceeded this site's execution time limit of "
                f"{limit:g} s and was stopped; the worker was replaced. Retrying the "
                f"same code will time out again: make the job smaller.",
            )
        except WorkerDied as exc:
            if ticket.cancelled:
                yield _error(pb.CANCELLED, "job cancelled while running; the worker was replaced")
            else:
                slot.replace()
                yield _error(
                    pb.WORKER_LOST,
                    f"the model worker at {self.config.site} died "
                    f"during the job ({exc}); it is being replaced. A retry makes sense.",
                )
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()


def _policy(config: SiteConfig) -> pb.SandboxPolicy:
    from site_agent.sandbox_policy import build_source_policy

    policy = build_source_policy(config.sandbox.policy)  # the site's own (its YAML)
    return pb.SandboxPolicy(
        name=policy.name,
        version=policy.version,
        describe_json=json.dumps(policy.describe(), sort_keys=True),
    )


def _effective_limit(requested: float, site_limit: float) -> float:
    """The broker may ask for less time than the site allows, never more; junk means default."""
    if math.isfinite(requested) and requested > 0:
        return min(requested, site_limit)
    return site_limit


_ERROR_KINDS = {"USER": pb.USER, "REFUSED": pb.REFUSED, "INTERNAL": pb.INTERNAL}


def _translate(item: tuple) -> pb.ExecuteUpdate:
    """Worker tuples (see worker.py) to wire messages."""
    tag = item[0]
    if tag == "running":
        return _status("RUNNING", "your job has started running")
    if tag == "log":
        return pb.ExecuteUpdate(log=pb.LogLine(text=item[1]))
    if tag == "chunk":  # bytes, or a read-only array over Ray's object store (worker.py)
        return ChunkUpdate(item[1])  # serialized without protobuf's copies (proto/chunks.py)
    if tag == "done":
        return pb.ExecuteUpdate(done=pb.ResultEnd(**item[1]))
    if tag == "error":
        return _error(_ERROR_KINDS.get(item[1], pb.INTERNAL), item[2])
    return _error(pb.INTERNAL, f"worker sent an unknown update {tag!r}")
