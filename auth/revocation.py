"""Token revocation by `jti`: a small list beside the keys that the broker re-reads on change.

Flow: `edif token revoke` adds the token's `jti` with its expiry to `revoked.json` in the keys
folder (written to a temporary file and renamed, under the key store's lock-free rename
semantics); every verification asks `is_revoked(jti)`, which re-reads the file only when its
modification time changed (one `stat` per request), so a revocation takes effect on the next
request without restarting the broker. Entries are dropped once their token has expired
anyway, so the list stays small.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from edif.clock import Clock, SystemClock

FILENAME = "revoked.json"


class RevocationList:
    def __init__(self, directory: Path, clock: Clock | None = None) -> None:
        self.path = Path(directory) / FILENAME
        self._clock = clock or SystemClock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of what _revoked reflects
        self._revoked: dict[str, float] = {}

    def is_revoked(self, jti: str) -> bool:
        self._refresh()
        return jti in self._revoked

    def revoke(self, jti: str, expires_at: float) -> None:
        """Add `jti` (kept until `expires_at`, when the token would be refused anyway)."""
        self._refresh()
        now = self._clock.now()
        entries = {j: exp for j, exp in self._revoked.items() if exp > now}
        entries[jti] = max(expires_at, now)
        self._write(entries)

    def entries(self) -> dict[str, float]:
        self._refresh()
        return dict(self._revoked)

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._seen, self._revoked = None, {}
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            self._revoked = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
            self._seen = seen

    def _write(self, entries: dict[str, float]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".revoked-")
        with os.fdopen(fd, "w") as out:
            json.dump(entries, out, sort_keys=True)
        os.replace(tmp, self.path)
        self._seen = None
