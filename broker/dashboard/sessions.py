"""Browser sessions for the governance dashboard: opaque, short-lived, server-side.

Flow: a staff member posts their governance JWT once to `/admin/login`; the routes verify it
with the broker's `TokenVerifier` and call `SessionStore.create`, which returns a random
256-bit session id for the cookie. The JWT itself is dropped right there: it never reaches a
cookie, a URL or a page. Each later request presents the cookie; `get` looks up the SHA-256 of
the id (so a memory dump of the table yields nothing usable as a cookie) and refuses it once
expired. Every session carries its own CSRF token, which state-changing forms must echo.

Sessions live in memory: a broker restart logs everyone out, which is the safe direction.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass, field

from edif.clock import Clock

SESSION_TTL_S = 30 * 60  # short-lived by design; never longer than the token that opened it
MAX_SESSIONS = 1000  # bounds memory if someone logs in in a loop


@dataclass(frozen=True)
class Session:
    """One logged-in staff member. `sub` stays in memory for audit attribution only."""

    sub: str = field(repr=False)  # the raw id: never rendered, logged or put in a cookie
    role: str
    pseudonym: str  # what pages show for the person
    csrf: str = field(repr=False)
    expires: float

    def csrf_ok(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf, presented or "")


class SessionStore:
    def __init__(self, clock: Clock, ttl_s: float = SESSION_TTL_S) -> None:
        self._clock = clock
        self._ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, sub: str, role: str, pseudonym: str, token_exp: float | None) -> str:
        """A new session; returns the opaque id the cookie carries."""
        now = self._clock.now()
        expires = now + self._ttl_s
        if token_exp is not None:
            expires = min(expires, token_exp)
        session_id = secrets.token_urlsafe(32)
        session = Session(sub, role, pseudonym, secrets.token_urlsafe(32), expires)
        with self._lock:
            self._purge(now)
            if len(self._sessions) >= MAX_SESSIONS:  # drop the oldest rather than grow
                oldest = min(self._sessions, key=lambda k: self._sessions[k].expires)
                del self._sessions[oldest]
            self._sessions[_digest(session_id)] = session
        return session_id

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(_digest(session_id))
            if session is None:
                return None
            if session.expires <= self._clock.now():
                del self._sessions[_digest(session_id)]
                return None
            return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._sessions.pop(_digest(session_id), None)

    def max_age(self, session_id: str) -> int:
        session = self.get(session_id)
        return max(0, int(session.expires - self._clock.now())) if session else 0

    def _purge(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()
