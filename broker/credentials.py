"""The broker's own credentials towards site agents: short-lived tokens, one audience per site.

Each site accepts only tokens with role `broker` and audience `edif-site:<site>`, so a token
stolen from one site's traffic is useless at another. Tokens are cached and reissued once less
than `refresh_margin_s` of their lifetime is left, so signing stays off the hot path.
"""

from __future__ import annotations

from typing import Protocol

from edif.clock import Clock


class TokenSigner(Protocol):
    def issue(self, sub: str, role: str, ttl_s: int, audience: str = ...) -> str: ...


def site_audience(site: str) -> str:
    return f"edif-site:{site}"


class CachedSiteCredentials:
    def __init__(
        self,
        signer: TokenSigner,
        role: str,
        clock: Clock,
        ttl_s: float = 300.0,
        subject: str = "edif-broker",
    ) -> None:
        self._signer = signer
        self._role = role
        self._clock = clock
        self._ttl_s = max(int(ttl_s), 2)
        self._subject = subject
        self._cache: dict[str, tuple[str, float]] = {}  # site -> (token, reissue after)

    def token_for(self, site: str) -> str:
        now = self._clock.now()
        cached = self._cache.get(site)
        if cached is not None and now < cached[1]:
            return cached[0]
        token = self._signer.issue(
            self._subject, self._role, self._ttl_s, audience=site_audience(site)
        )
        # Reissue with a fifth of the lifetime left: covers clock skew and calls in flight.
        self._cache[site] = (token, now + self._ttl_s * 0.8)
        return token
