"""Relay what a request's code prints, one line at a time, while it runs.

`LogRelay(emit)` is a context manager that points `sys.stdout` at itself, buffers writes,
calls `emit(line)` (without the newline) for every completed line as soon as it is written,
and on exit emits a trailing partial line, so `print("x", end="")` is not lost. The agent
turns each line into one LOG status (spec §10 step 9).
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TextIO


class LogRelay(io.TextIOBase):
    """A text stream that emits completed lines; use as `with LogRelay(emit): ...`."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        super().__init__()
        self._emit = emit
        self._pending = ""
        self._owner = threading.get_ident()
        self._previous: TextIO | None = None
        self._redirect: contextlib.redirect_stdout | None = None

    @property
    def encoding(self) -> str:  # read by libraries that print, e.g. to pick characters
        return "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        # redirect_stdout swaps the process-wide sys.stdout. The worker runs one job at a time
        # on one thread (nnsight's interleaving uses greenlets on that same thread), so only
        # other threads of the process (e.g. the actor runtime) can also write here: pass their
        # text through to the stream we replaced instead of leaking it into the user's log.
        if threading.get_ident() != self._owner:
            return self._previous.write(text) if self._previous is not None else len(text)
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        # A partial line waits for its newline (or the end of the run), whatever print(flush=)
        # says, so one LOG status is always one line.
        return None

    def finish(self) -> None:
        """Emit the trailing partial line, if any."""
        if self._pending:
            line, self._pending = self._pending, ""
            self._emit(line)

    def __enter__(self) -> LogRelay:
        self._previous = sys.stdout
        self._redirect = contextlib.redirect_stdout(self)
        self._redirect.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._redirect is not None
        self._redirect.__exit__(exc_type, exc, tb)
        self._redirect = None
        self.finish()
