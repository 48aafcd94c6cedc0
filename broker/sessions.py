"""Websocket sessions: which `/subscribe` socket belongs to whom, and which job it carries.

Flow: the front accepts a socket (with or without a valid key), registers it here and sends the
session id as the first frame. A POST names that id in its envelope; `claim` binds the session to
the job, refusing a session opened by another identity (spec §3.1, §12) or one that already
carries a running job (the client reads every frame on a socket as its own job's). Sends on one
socket are serialised by a lock, because the job's relay and its heartbeat both write to it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from edif.errors import BadRequest, PermissionDenied

log = logging.getLogger(__name__)


class FrameSink(Protocol):
    """The sending half of a websocket."""

    async def send_text(self, data: str) -> None: ...

    async def send_bytes(self, data: bytes) -> None: ...


@dataclass(eq=False)
class Session:
    id: str
    sink: FrameSink = field(repr=False)
    owner_sub: str | None = field(repr=False)  # None: opened without a valid key
    job_id: str | None = None
    open: bool = True
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def send(self, frame: str | bytes, wanted: Callable[[], bool] | None = None) -> bool:
        """Send one frame; False if not sent (a client that has gone also closes the session).

        `wanted` is checked once the lock is held, so a heartbeat queued behind the terminal
        status is dropped instead of following it.
        """
        async with self.lock:
            if not self.open or (wanted is not None and not wanted()):
                return False
            try:
                if isinstance(frame, bytes):
                    await self.sink.send_bytes(frame)
                else:
                    await self.sink.send_text(frame)
            except Exception as error:  # any transport failure means the client is gone
                log.info("session %s: send failed (%s); client gone", self.id, type(error).__name__)
                self.open = False
                return False
        return True


class SessionRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def open(self, sink: FrameSink, owner_sub: str | None) -> Session:
        session = Session(id=secrets.token_urlsafe(16), sink=sink, owner_sub=owner_sub)
        self._sessions[session.id] = session
        return session

    def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.open = False

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def claim(self, session_id: str, sub: str, job_id: str, busy: Callable[[str], bool]) -> Session:
        """Bind session `session_id` to `job_id` for identity `sub`.

        `busy(job_id)` says whether a job the session already carries is still running.
        """
        session = self._sessions.get(session_id)
        if session is None or not session.open:
            raise BadRequest(
                "The websocket session named in the request is not open; "
                "connect to /subscribe first and keep it open."
            )
        if session.owner_sub is not None and not hmac.compare_digest(
            session.owner_sub.encode(), sub.encode()
        ):
            raise PermissionDenied("This websocket session was opened by another identity.")
        if session.job_id is not None and busy(session.job_id):
            raise BadRequest("This websocket session already carries a running job.")
        # A socket opened without a key is bound to the first identity that uses it.
        session.owner_sub = sub
        session.job_id = job_id
        return session

    def __len__(self) -> int:
        return len(self._sessions)
