"""`CheckState`: one health check with Consul's TTL and deregister-after rules, clock-driven.

Shared by `EmbeddedCatalog` and the fake Consul so both age sites exactly alike:

- `update` (a TTL pass/warn/fail, or a probe result) sets the status and output and restarts
  the TTL timer;
- `expire(now)` turns a TTL check that was not updated within its TTL critical ("TTL expired"),
  dated from when the TTL ran out, not from when someone noticed;
- `reapable(now)` is true once the check has been critical for longer than its
  deregister-after window; the owner then removes the whole service.

Times are `Clock.monotonic()` seconds: durations only, never compared across hosts.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.model import Health

TTL_EXPIRED = "TTL expired"


@dataclass
class CheckState:
    status: Health
    output: str
    updated_at: float
    ttl_s: float | None = None  # None: not a TTL check; only `update` changes it
    deregister_after_s: float | None = None
    critical_since: float | None = None

    def __post_init__(self) -> None:
        if self.status == "critical" and self.critical_since is None:
            self.critical_since = self.updated_at

    def update(self, status: Health, output: str, now: float) -> bool:
        """Set status and output, restart the TTL; True when either visibly changed."""
        changed = (status, output) != (self.status, self.output)
        if status != "critical":
            self.critical_since = None
        elif self.status != "critical":
            self.critical_since = now
        self.status, self.output, self.updated_at = status, output, now
        return changed

    def expire(self, now: float) -> bool:
        """Apply the TTL; True when the check just turned critical."""
        if self.ttl_s is None or self.status == "critical":
            return False
        expired_at = self.updated_at + self.ttl_s
        if now <= expired_at:
            return False
        self.status, self.output, self.critical_since = "critical", TTL_EXPIRED, expired_at
        return True

    def reapable(self, now: float) -> bool:
        if self.deregister_after_s is None or self.critical_since is None:
            return False
        return now - self.critical_since > self.deregister_after_s
