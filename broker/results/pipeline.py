"""A result store writer driven from the event loop, with the work done on one thread.

Why: a `ResultWriter` hashes every byte, writes it to disk (or uploads parts to object
storage) and fsyncs on commit. Done on the event loop, a 1 GiB result held every other
client's websocket and POST for seconds, and the broker could not take the site's next gRPC
message while it wrote the last one. `BackgroundWriter` hands each chunk to a single worker
thread (FIFO, so the bytes land in order) and returns at once, so receiving chunk n+1 overlaps
hashing and writing chunk n; at most `max_pending_bytes` wait for the thread, beyond that
`write` waits (backpressure that reaches the site through gRPC flow control).

Nothing is checked less: the store's writer still sees every chunk in order, its size cap and
sha256 are unchanged, and `commit` (the only way to a `ResultRef`) runs only after every
chunk was written. A chunk the thread failed to write (a size cap, a full disk) fails a later
`write` or the `commit`, so the job ends in ERROR exactly as before, a few chunks later at most.
Small results (the common case) never start the thread: up to `inline_bytes` in all, chunks
are written on the spot, as before, and where the store's commit waits for nothing (a disk
store without fsyncs: `commit_on_loop`) they are committed on the spot too.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from broker.results.base import ResultRef, ResultWriter

T = TypeVar("T")

INLINE_BYTES = 256 * 1024  # a result this small costs less to write than a hop to a thread
MAX_PENDING_BYTES = 16 * 1024 * 1024  # two 8 MiB chunks: little left to write at ResultEnd


class BackgroundWriter:
    """One result's `ResultWriter`, opened lazily, written in order on its own thread."""

    def __init__(
        self,
        open_writer: Callable[[], ResultWriter],
        max_pending_bytes: int = MAX_PENDING_BYTES,
        inline_bytes: int = INLINE_BYTES,
    ) -> None:
        self._open = open_writer
        self._writer: ResultWriter | None = None
        self._max_pending = max_pending_bytes
        self._inline = inline_bytes
        self._thread: ThreadPoolExecutor | None = None
        self._pending: collections.deque[tuple[Future[None], int]] = collections.deque()
        self._pending_bytes = 0
        self._written = 0  # bytes written on the event loop (small results only)

    async def write(self, chunk: bytes) -> None:
        """Queue `chunk` after every earlier one; raises what an earlier write raised."""
        self._reap()
        if self._thread is None and self._written + len(chunk) <= self._inline:
            self._opened().write(chunk)
            self._written += len(chunk)
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edif-result")
        writer = self._opened()
        self._pending.append((self._thread.submit(writer.write, chunk), len(chunk)))
        self._pending_bytes += len(chunk)
        while self._pending_bytes > self._max_pending:
            await self._wait_oldest()

    async def commit(
        self,
        expected_size: int | None,
        expected_sha256: str | None,
        then: Callable[[ResultRef], T] = lambda ref: None,
    ) -> tuple[ResultRef, T]:
        """Wait for every chunk, then commit (size, sha256, fsync, publish) off the loop, and
        run `then(ref)` on the same thread: what follows a commit (the safety check, reading
        a small result back) costs no second hop to a thread and back.

        If a chunk failed, that error is raised and the caller must `abort`."""
        while self._pending:
            await self._wait_oldest()
        writer, self._writer = self._opened(), None

        def commit_then() -> tuple[ResultRef, T]:
            ref = writer.commit(expected_size, expected_sha256)
            return ref, then(ref)

        try:
            if self._thread is None and writer.commit_on_loop:
                # A small result (written on the loop) in a store whose commit waits for
                # nothing: cheaper here than a trip to a thread and back.
                return commit_then()
            return await asyncio.to_thread(commit_then)
        finally:
            self._stop()

    def abort(self) -> None:
        """Drop the partial result; idempotent. Writes not yet started are cancelled, and the
        store's abort runs on the thread after the write in progress, so no write can land in a
        file that was already deleted."""
        writer, self._writer = self._writer, None
        pending, self._pending, self._pending_bytes = self._pending, collections.deque(), 0
        for future, _size in pending:
            future.cancel()
        if writer is not None:
            if self._thread is not None:
                self._thread.submit(writer.abort)
            else:
                writer.abort()
        self._stop()

    def _opened(self) -> ResultWriter:
        if self._writer is None:
            self._writer = self._open()
        return self._writer

    async def _wait_oldest(self) -> None:
        future, size = self._pending[0]
        await asyncio.wrap_future(future)  # raises the write's error, if any
        self._pending.popleft()
        self._pending_bytes -= size

    def _reap(self) -> None:
        """Forget finished writes; re-raise the first failure."""
        while self._pending and self._pending[0][0].done():
            future, size = self._pending.popleft()
            self._pending_bytes -= size
            future.result()

    def _stop(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None
