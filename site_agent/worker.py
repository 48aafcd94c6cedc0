"""The model worker: one process holding one loaded model, running one job at a time.

Runs as a Ray actor (see `ray_pool.py`). The agent process never runs researcher code; this
process does, so it is started with no secrets in its environment (the agent holds none
either: it verifies the broker with public keys only). Every job runs on the same dedicated
thread, because nnsight's trace depth and saved set are thread-local while its source caches
and the model's interleaver are process-wide (spec §11.6).

The agent drives a job with plain calls (`ray_pool.RayWorkerHandle`): `begin` starts it and
returns its updates once one of them should travel (a LOG line, a full chunk, the end), and
`more` returns the next ones, until the end; a job that ends within the first call (most small
jobs) costs one Ray call. One plain call here takes about half the time of a Ray streaming
generator call that yields twice (0.95 against 1.7 ms p50 on the 2-core VM; docs/benchmarks.md
section 10). `execute` is the same job as one generator, for in-process use.
Items: ("running",) · ("log", text) · ("chunk", buffer) · ("done", meta[, buffer]) ·
("error", kind, text) · ("error", kind, text, True): the job changed shared state and the
agent must replace this worker before its next job. A buffered (compressed) result's last
chunk rides on "done".

Sandbox (layers 2 to 4; layer 1 is the source check in `run_request`, against the site's own
policy, `sandbox_policy.py`): after the model has loaded, the job thread confines its writes
to a private scratch root with Landlock (`scratch.py`; each job gets a fresh directory beneath
it as its working directory, and everything beneath the root is removed after the job) and
contains itself with a seccomp filter (`containment.py`; refused start-up where either is
missing unless the site config opts out), and the worker takes the isolation baseline
(`isolation.py`). Blocks and shipped functions run with restricted builtins
(`runtime_guard.py`, applied in `execution.deserialize` and the unpickler). After each job
the shared state is fingerprinted again and the scratch root emptied; a job that changed the
state, or left files that cannot be removed, ends in an error and asks for a new worker.
Refusals always name the site's policy (`name vN`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import sys
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from site_agent.config import ModelConfig

_END = object()
_REPLACING = "this model worker is being replaced after an earlier job; retry"
# The tags of a job's last update: after one of them the job has ended.
ENDS = frozenset({"done", "error"})
# How long one `more` call waits for an update before it returns none (the agent calls again).
LONG_POLL_S = 1.0


@dataclass
class _Job:
    """One job's updates, as its job thread produces them, and the chunks not yet shipped."""

    updates: queue.Queue = field(default_factory=queue.Queue)
    in_flight: Any = None  # chunking.InFlight
    returned_chunks: int = 0  # chunks the last `begin`/`more` returned, in Ray's store by the next

    def shipped(self) -> None:
        for _ in range(self.returned_chunks):
            self.in_flight.leave()
        self.returned_chunks = 0


def _zero_copy(view: memoryview | bytearray) -> Any:
    """A chunk Ray carries without copying it in Python: a uint8 array over `view` is pickled
    out of band, straight into the object store, and the agent reads it from there in place.
    Pickling `bytes` copies each chunk twice more on the way in (1 GiB: 0.94-1.21 s of actor
    CPU in 8 MiB chunks, against 0.16-0.27 s as arrays; docs/benchmarks.md section 2)."""
    import numpy as np

    return np.frombuffer(view, dtype=np.uint8)


def _contaminated(changed: list[str]) -> str:
    shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
    return (
        f"the job changed state shared with other users' jobs ({shown}); its result is "
        "withheld and the model worker is being replaced"
    )


class ModelWorker:
    def __init__(self, model_json: str, chunk_bytes: int) -> None:
        import torch

        from site_agent.loading import load_model, parameter_bytes
        from site_agent.sandbox_policy import build_source_policy
        from site_agent.unpickler import PayloadPolicy

        self.cfg = ModelConfig.model_validate_json(model_json)
        torch.set_num_threads(self.cfg.torch_threads)
        self.chunk_bytes = chunk_bytes
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edif-job")
        # Load on the job thread too: some backends bind per-thread state at load time.
        self.model = self._thread.submit(load_model, self.cfg).result()
        self.param_bytes = parameter_bytes(self.model)
        self.policy = PayloadPolicy(source=build_source_policy(self.cfg.sandbox.policy))
        self.scratch: Any = None  # scratch.Scratch where Landlock confines the job thread
        self.contained = self._thread.submit(self._contain).result()
        self._baseline = self._thread.submit(self._fingerprint).result()
        self._tainted = False
        self._job: _Job | None = None  # the job `begin` started and `more` reads on

    def _contain(self) -> bool:
        """Contain the job thread for the rest of its life (after loading: that writes).

        Landlock first (per-job scratch, writes elsewhere refused), then seccomp, which
        leaves path-checked writes to Landlock only where Landlock is on.
        """
        from site_agent.containment import ContainmentUnavailable, contain_thread

        landlock = self._confine_writes()
        try:
            contain_thread(landlock=landlock)
        except ContainmentUnavailable:
            if self.cfg.sandbox.require_seccomp:
                raise  # the slot turns UNHEALTHY with this message
            return False
        return True

    def _confine_writes(self) -> bool:
        """Give jobs a scratch root and confine the job thread's writes to it (scratch.py)."""
        from site_agent.scratch import (
            LandlockUnavailable,
            Scratch,
            own_working_directory,
            restrict_writes,
        )

        scratch = Scratch.create(self.cfg.sandbox.scratch_dir)
        try:
            restrict_writes(scratch.root)
        except LandlockUnavailable:
            scratch.remove()
            if self.cfg.sandbox.require_landlock:
                raise  # the slot turns UNHEALTHY with this message
            return False
        # The job thread's working directory becomes each job's scratch directory: imports
        # must not resolve through it, so no relative entry may stay on sys.path.
        sys.path[:] = [p if os.path.isabs(p) else os.path.abspath(p) for p in sys.path]
        scratch.own_cwd = own_working_directory()
        self.scratch = scratch
        weakref.finalize(self, scratch.remove)
        return True

    def _fingerprint(self):  # noqa: ANN202 - isolation.Fingerprint, imported late
        if not self.cfg.sandbox.check_isolation:
            return None
        from site_agent.isolation import fingerprint

        return fingerprint(self.model, baseline=True)

    def _contamination(self) -> list[str]:
        """What the last job changed in shared state (isolation.py); empty if nothing."""
        if self._baseline is None:
            return []
        from site_agent.isolation import differences, fingerprint

        after = fingerprint(self.model)
        changed = differences(self._baseline, after)
        if not changed:
            # What a clean job left is the next job's baseline, comparing the same attributes:
            # a data attribute it changed (a cache) no longer takes the slow path every job.
            self._baseline = dataclasses.replace(after, compared=self._baseline.compared)
        return changed

    def _clear_scratch(self) -> list[str]:
        """Remove what the job wrote; anything left would reach the next job."""
        if self.scratch is None:
            return []
        try:
            left = self.scratch.end()
        except OSError as exc:
            left = [str(exc)]
        return [f"its scratch directory could not be emptied ({'; '.join(left)})"] if left else []

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "param_bytes": self.param_bytes, "contained": self.contained}

    def execute(self, payload: bytes, compress: bool, env_json: str) -> Iterator[tuple]:
        """The whole job as one generator of updates (in-process use, tests)."""
        job = self._start(payload, compress, env_json)
        try:
            while (item := job.updates.get()) is not _END:
                yield item
                if item[0] == "chunk":  # the consumer has it by the time the generator resumes
                    job.in_flight.leave()
        finally:
            job.in_flight.close()  # nobody reads on (closed early): the job thread must not wait

    def begin(
        self, payload: bytes, compress: bool, env_json: str, wait_s: float = LONG_POLL_S
    ) -> list[tuple]:
        """Start a job; return its updates as soon as one should travel (see `_take`). A job
        that ends within `wait_s` comes back whole, in this one call."""
        self.abandon()
        self._job = self._start(payload, compress, env_json)
        return self._take(self._job, wait_s)

    def more(self, wait_s: float = LONG_POLL_S) -> list[tuple]:
        """The current job's next updates; [] when none came within `wait_s`."""
        job = self._job
        if job is None:
            return [("error", "INTERNAL", "no job is running on this model worker")]
        job.shipped()  # what the last call returned is in Ray's store: its chunks left here
        return self._take(job, wait_s)

    def abandon(self) -> None:
        """Nobody reads the current job's updates any more: its job thread must not wait."""
        if self._job is not None:
            self._job.in_flight.close()
            self._job = None

    def _start(self, payload: bytes, compress: bool, env_json: str) -> _Job:
        from site_agent.chunking import InFlight

        job = _Job(in_flight=InFlight())
        env = json.loads(env_json or "{}")
        self._thread.submit(self._run, payload, compress, env, job.updates, job.in_flight)
        return job

    def _take(self, job: _Job, wait_s: float) -> list[tuple]:
        """Wait (at most `wait_s`) for an update that should travel now, then take every update
        queued. "running" alone does not travel (the agent said so when it called) and neither
        does a short chunk (the result's last: only its end follows, and soon)."""
        deadline = time.monotonic() + wait_s
        items: list[tuple] = []
        urgent = False
        while True:
            try:
                timeout = max(0.0, deadline - time.monotonic())
                item = job.updates.get(block=not urgent, timeout=timeout)
            except queue.Empty:
                break
            if item is _END:
                break
            items.append(item)
            tag = item[0]
            if tag in ENDS:  # nothing the job queues after its end counts
                if self._job is job:
                    self._job = None
                break
            if tag == "chunk":
                job.returned_chunks += 1
            urgent = urgent or tag == "log" or (tag == "chunk" and len(item[1]) >= self.chunk_bytes)
        return items

    def _run(
        self, payload: bytes, compress: bool, env: dict, updates: queue.Queue, in_flight: Any
    ) -> None:
        from edif.errors import PayloadRefused, UserCodeError, WorkerContaminated
        from site_agent.chunking import ChunkCutter
        from site_agent.execution import run_request

        updates.put(("running",))
        if self._tainted:  # a job already contaminated this worker; it is being replaced
            updates.put(("error", "INTERNAL", _REPLACING, True))
            updates.put(_END)
            return
        error: tuple | None = None
        label = self.policy.source.label
        emit = lambda s: updates.put(("log", s))  # noqa: E731
        # Uncompressed results stream while they are encoded (chunking.py). The chunks carry
        # no answer until "done", which still comes only after the isolation check below; a
        # job that fails after some chunks ends in "error", and the broker drops them.
        send = lambda buf: updates.put(("chunk", _zero_copy(buf)))  # noqa: E731
        cutter = None if compress else ChunkCutter(self.chunk_bytes, send, in_flight)
        try:
            if self.scratch is not None:
                self.scratch.begin()
            sink = cutter.write if cutter is not None else None
            out = run_request(self.model, payload, compress, env, emit, self.policy, sink)
            if cutter is not None:
                cutter.close()
        except PayloadRefused as exc:
            # Name the site's policy in every refusal, also the unpickler's.
            detail = exc.message if label in exc.message else f"{exc.message} (site policy {label})"
            error = ("error", "REFUSED", detail)
        except UserCodeError as exc:
            error = ("error", "USER", exc.message)
        except BaseException as exc:  # noqa: BLE001 - any failure must end the job, not the worker
            error = ("error", "INTERNAL", f"{type(exc).__name__}: {exc}")
        try:
            changed = self._contamination()
        except BaseException as exc:  # noqa: BLE001 - a check that fails counts as a change
            changed = [f"the isolation check failed: {type(exc).__name__}: {exc}"]
        changed += self._clear_scratch()
        if changed:
            self._tainted = True
            error = ("error", "USER", WorkerContaminated(_contaminated(changed)).message, True)
        if error is not None:
            updates.put(error)
            updates.put(_END)
            return
        try:
            last: tuple = ()
            if cutter is not None:
                total, sha256 = cutter.total, cutter.sha256
            else:
                data = memoryview(out.result_bytes)
                starts = range(0, len(data), self.chunk_bytes)
                pieces = [_zero_copy(data[i : i + self.chunk_bytes]) for i in starts]
                for piece in pieces[:-1]:
                    updates.put(("chunk", piece))
                last = tuple(pieces[-1:])
                total, sha256 = len(data), hashlib.sha256(data).hexdigest()
            meta = {
                "total_bytes": total,
                "sha256": sha256,
                "execution_s": out.execution_s,
                "peak_memory_bytes": out.peak_memory_bytes,
                "deserialize_s": out.deserialize_s,
                "encode_s": out.encode_s,
            }
            updates.put(("done", meta, *last))
        finally:
            updates.put(_END)
