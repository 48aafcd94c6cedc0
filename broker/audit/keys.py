"""The audit pseudonym keys: kept apart from the logs/metrics key, rotated, addressed by kid.

Each key is a 32-byte file `audit-pseudonym-<kid>.key` (0600) in the broker's key folder
(`$EDIF_HOME/keys` by default), never `pseudonym.key`, which the logs and metrics use: an
audit pseudonym cannot be joined with a log line. The kid is the UTC creation time plus a random
tag (`20260102T030405Z-9f3a`), so sorting kids sorts keys by age and the newest is the active
one. Rotation = create a new key: new entries use it, older entries keep the kid they were
written with, and old keys stay so a data subject's entries can still be found for export or
erasure (destroying an old key file unlinks, for good, every entry written under it).
`active()` rotates by itself once the active key is older than `rotation_s`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path

from auth.keys import create_private_file, ensure_private_dir
from edif.clock import Clock, SystemClock
from edif.errors import ConfigError

KEY_BYTES = 32
_PREFIX = "audit-pseudonym-"
_FILE = re.compile(r"audit-pseudonym-(\d{8}T\d{6}Z-[0-9a-f]{4})\.key")
_KID_TIME = "%Y%m%dT%H%M%SZ"


def audit_pseudonym(key: bytes, user_id: str) -> str:
    """'a-' + 32 hex digits of HMAC-SHA256(key, user id): stable per key, not reversible."""
    return "a-" + hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def kid_created_at(kid: str) -> float:
    return datetime.strptime(kid.split("-", 1)[0], _KID_TIME).replace(tzinfo=UTC).timestamp()


class AuditKeyring:
    """The audit pseudonym keys in one folder."""

    def __init__(
        self, directory: Path, rotation_s: float | None = None, clock: Clock | None = None
    ) -> None:
        self.directory = Path(directory)
        self._rotation_s = rotation_s
        self._clock = clock or SystemClock()
        self._keys: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"AuditKeyring({str(self.directory)!r})"

    def kids(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(m[1] for name in names if (m := _FILE.fullmatch(name)))

    def active(self) -> tuple[str, bytes]:
        """The newest key as (kid, key); a new one when there is none or it is due."""
        kids = self.kids()
        due = (
            kids
            and self._rotation_s
            and self._clock.now() - kid_created_at(kids[-1]) >= self._rotation_s
        )
        kid = self.rotate() if not kids or due else kids[-1]
        return kid, self.key(kid)

    def rotate(self) -> str:
        """Create a new key; from now on it is the active one. Returns its kid."""
        ensure_private_dir(self.directory)
        stamp = datetime.fromtimestamp(self._clock.now(), UTC).strftime(_KID_TIME)
        kid = f"{stamp}-{secrets.token_hex(2)}"
        create_private_file(self._path(kid), secrets.token_bytes(KEY_BYTES))
        return kid

    def key(self, kid: str) -> bytes:
        if kid not in self._keys:
            try:
                key = self._path(kid).read_bytes()
            except OSError as error:
                raise ConfigError(f"audit pseudonym key {kid} is missing: {error}") from error
            if len(key) != KEY_BYTES:
                raise ConfigError(f"audit pseudonym key {kid} must hold {KEY_BYTES} bytes")
            self._keys[kid] = key
        return self._keys[kid]

    def pseudonym(self, user_id: str) -> tuple[str, str]:
        """(kid, pseudonym) of `user_id` under the active key."""
        kid, key = self.active()
        return kid, audit_pseudonym(key, user_id)

    def pseudonyms_of(self, user_id: str) -> dict[str, str]:
        """The user's pseudonym under every key still held, by kid (export, erasure)."""
        return {kid: audit_pseudonym(self.key(kid), user_id) for kid in self.kids()}

    def _path(self, kid: str) -> Path:
        return self.directory / f"{_PREFIX}{kid}.key"
