"""Stable pseudonyms for user ids, so logs and metrics never carry the raw id.

`Pseudonymizer(key)("alice")` is "u-" + the first 16 hex digits of HMAC-SHA256(key, "alice"):
the same user always maps to the same pseudonym (logs stay joinable), and without the key the
id cannot be recovered by hashing a list of candidate names. The key is a 32-byte file
`pseudonym.key` (0600) next to the signing keys, created on first use; `from_home` loads it,
and two processes creating it at once end up with the same key (the first link wins).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from auth.keys import create_private_file, ensure_private_dir
from edif.config import edif_home
from edif.errors import ConfigError

KEY_FILE = "pseudonym.key"
KEY_BYTES = 32


class Pseudonymizer:
    """Maps user ids to keyed, stable pseudonyms."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("pseudonym key must be at least 16 bytes")
        self._key = key

    def __call__(self, user_id: str) -> str:
        digest = hmac.new(self._key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return "u-" + digest[:16]

    def __repr__(self) -> str:
        return "Pseudonymizer(<key hidden>)"

    @classmethod
    def from_home(cls, directory: Path | None = None) -> Pseudonymizer:
        """Load `<directory>/pseudonym.key`, creating it if missing (default `$EDIF_HOME/keys`)."""
        directory = Path(directory) if directory is not None else edif_home() / "keys"
        path = directory / KEY_FILE
        if not path.exists():
            ensure_private_dir(directory)
            create_private_file(path, secrets.token_bytes(KEY_BYTES))
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ConfigError(
                f"{path} must hold exactly {KEY_BYTES} bytes (deleting it renews every pseudonym)"
            )
        return cls(key)
