"""A result cut into chunks while `torch.save` writes it (uncompressed results).

Why: buffering the whole result first costs a second, fresh copy of it in the worker (1 GiB:
`torch.save` into a growing `BytesIO`, 0.6 s here and up to 2 s where fresh memory is slow to
touch), a separate sha256 pass over it (0.5 s per GiB), and the transfer cannot start until
both are done. Cut as it is written, the result flows to the agent while `torch.save` is
still writing, each byte is hashed once on the way, and the worker holds a few chunks, not
the whole result, so chunk buffers are freed and their memory reused as they go.

Flow: `torch.save` → `ChunkCutter.write` (copies into `chunk_bytes` buffers, hashes) → each
full buffer to `emit` (the worker queues it for Ray) → `close()` emits the last, short one.
`InFlight` bounds how many chunks wait between the job thread and Ray: the cutter waits for
a slot, the worker frees one once Ray has stored the chunk (when the agent's next call
arrives). The wait is bounded, so a stalled consumer slows the job thread down but can never
hang it, and once the job is abandoned (nobody reads on) nothing waits at all.

Compressed results do not stream: the client needs zstd's one-shot frame, whose header holds
the content size (site_agent/encoding.py).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

IN_FLIGHT_CHUNKS = 4  # 32 MiB at the default 8 MiB chunk
WAIT_S = 30.0  # longest wait for a free slot before sending anyway


class InFlight:
    """How many chunks wait between the job thread (`enter`) and Ray (`leave`)."""

    def __init__(self, limit: int = IN_FLIGHT_CHUNKS, wait_s: float = WAIT_S) -> None:
        self._limit = limit
        self._wait_s = wait_s
        self._count = 0
        self._changed = threading.Condition()
        self._closed = False

    def enter(self) -> None:
        with self._changed:
            self._changed.wait_for(self._has_room, timeout=self._wait_s)
            self._count += 1  # also past a timeout: late beats never

    def leave(self) -> None:
        with self._changed:
            self._count = max(0, self._count - 1)
            self._changed.notify()

    def close(self) -> None:
        """The reader is gone: `enter` stops waiting, for good."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _has_room(self) -> bool:
        return self._closed or self._count < self._limit


class ChunkCutter:
    """A write-only file for `torch.save` that emits `chunk_bytes` pieces as they fill up."""

    def __init__(
        self, chunk_bytes: int, emit: Callable[[bytearray], None], in_flight: InFlight
    ) -> None:
        self._size = chunk_bytes
        self._emit = emit
        self._in_flight = in_flight
        self._hash = hashlib.sha256()
        self._buffer = bytearray()
        self.total = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = len(view)
        self._hash.update(view)
        self.total += written
        while len(view):
            room = self._size - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) == self._size:
                self._send()
        return written

    def close(self) -> None:
        """Emit what is left (an empty result emits nothing)."""
        if self._buffer:
            self._send()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _send(self) -> None:
        buffer, self._buffer = self._buffer, bytearray()
        self._in_flight.enter()
        self._emit(buffer)
