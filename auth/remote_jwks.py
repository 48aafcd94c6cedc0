"""Public keys from a JWKS URL, cached, refetched on an unknown kid at a bounded rate.

Used for keys this process does not hold: an external OIDC issuer's (`auth.external`) and the
broker's, as seen by a site agent. Flow of `key_for(kid)`: fetch on first use; a known kid is
answered from the cache; an unknown kid (the issuer rotated) triggers a refetch, but at most
once per `min_refetch_s`, so a stream of tokens with made-up kids cannot turn the verifier into
a request flood against the issuer; a cache older than `max_age_s` is refreshed on the next
lookup, so a key the issuer withdrew stops verifying within that time. A failed fetch keeps
the keys already known (the issuer being briefly down must not log everyone out) and is only
an error when nothing was ever fetched.

`parse` turns the JWKS document into keys by kid; it decides which key types are acceptable.
`fetch` is injectable for tests; the default is a plain HTTP GET with a short timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import httpx

from edif.clock import Clock, SystemClock
from edif.errors import AuthenticationError

log = logging.getLogger(__name__)

K = TypeVar("K")
Fetch = Callable[[str], dict[str, Any]]


def http_fetch(timeout_s: float = 5.0) -> Fetch:
    """A GET of a JSON document; any failure is an OSError-like httpx or ValueError."""

    def fetch(url: str) -> dict[str, Any]:
        reply = httpx.get(url, timeout=timeout_s, follow_redirects=False)
        reply.raise_for_status()
        document = reply.json()
        if not isinstance(document, dict):
            raise ValueError("JWKS is not a JSON object")
        return document

    return fetch


class RemoteJwks(Generic[K]):
    def __init__(
        self,
        url: str,
        parse: Callable[[dict[str, Any]], Mapping[str, K]],
        clock: Clock | None = None,
        fetch: Fetch | None = None,
        min_refetch_s: float = 30.0,
        max_age_s: float = 3600.0,
        initial: Mapping[str, K] | None = None,
    ) -> None:
        self.url = url
        self._parse = parse
        self._clock = clock or SystemClock()
        self._fetch = fetch or http_fetch()
        self._min_refetch_s = min_refetch_s
        self._max_age_s = max_age_s
        self._keys: dict[str, K] = dict(initial or {})
        # monotonic time of the last fetch attempt / success; None: never
        self._tried_at: float | None = None
        self._fetched_at: float | None = self._clock.monotonic() if initial else None
        self._lock = threading.Lock()

    def key_for(self, kid: str) -> K | None:
        """The key `kid`, refetching the JWKS if it is unknown or the cache is stale."""
        now = self._clock.monotonic()
        with self._lock:
            stale = self._fetched_at is None or now - self._fetched_at >= self._max_age_s
            if (stale or kid not in self._keys) and self._may_fetch(now):
                self._refresh(now)
            if self._fetched_at is None:
                raise AuthenticationError(
                    f"cannot check this token: the issuer's key set at {self.url} could not be "
                    "fetched; try again later, or tell the eDIF operators if it persists"
                )
            return self._keys.get(kid)

    def keys(self) -> dict[str, K]:
        """Every key known now (fetching once if nothing was fetched yet)."""
        try:
            self.key_for("")
        except AuthenticationError:
            return {}
        return dict(self._keys)

    def _may_fetch(self, now: float) -> bool:
        return self._tried_at is None or now - self._tried_at >= self._min_refetch_s

    def _refresh(self, now: float) -> None:
        self._tried_at = now
        try:
            keys = dict(self._parse(self._fetch(self.url)))
        except Exception as exc:  # noqa: BLE001 - any failure keeps the last good key set
            log.warning("JWKS %s not refreshed: %s: %s", self.url, type(exc).__name__, exc)
            return
        self._keys, self._fetched_at = keys, now
