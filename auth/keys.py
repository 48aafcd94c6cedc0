"""Ed25519 signing keys on disk, and their public half as a JWKS.

A `KeyStore` is a private folder (0700) of PKCS8 PEM files named `<kid>.pem` (0600), where the
kid is the first 16 hex digits of sha256 over the raw public key. The token issuer asks it for
the signing key; verifiers ask it for every public key by kid, or read the same keys from the
JWKS it publishes (`jwks()` here, `public_keys_from_jwks()` on the other side).

Flow: the first `signing_key()` on an empty folder creates a key. Creation holds an exclusive
flock on `<dir>/.lock`, so two processes starting together make one key, not two; the PEM is
written to a temp file and hard-linked into place, so a reader never sees half a file and a
file is never overwritten. If the folder ever holds several keys (copied in by hand, or a later
rotation), the active signing key is the lexicographically first kid, so every process picks
the same one, and every key in the folder keeps verifying: that is the room left for rotation.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edif.config import edif_home
from edif.errors import ConfigError

log = logging.getLogger(__name__)

_KEY_FILE = re.compile(r"[0-9a-f]{16}\.pem")
_LOCK_FILE = ".lock"


def kid_of(public_key: Ed25519PublicKey) -> str:
    """The key id: first 16 hex digits of sha256 over the 32 raw public key bytes."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def ensure_private_dir(directory: Path) -> Path:
    """Create `directory` (0700) if missing; tighten it to 0700 if it is ours and looser."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    # mkdir's mode is filtered by the umask and an existing folder keeps its mode: set it.
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        directory.chmod(0o700)
    return directory


def create_private_file(path: Path, data: bytes) -> bool:
    """Create `path` (0600) holding `data`, atomically and only if it does not exist.

    Returns True if this call created it, False if the file was already there (another
    process won the race; the caller then reads theirs).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            # link, not rename: rename would silently replace a file another process made.
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


class KeyStore:
    """A folder of Ed25519 signing keys, addressed by kid."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, Ed25519PrivateKey] = {}

    @classmethod
    def default(cls) -> KeyStore:
        """The store under `$EDIF_HOME/keys`."""
        return cls(edif_home() / "keys")

    def __repr__(self) -> str:
        return f"KeyStore({str(self.directory)!r})"

    def kids(self) -> list[str]:
        """The kids of every key in the folder, sorted; empty if the folder does not exist."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(name[:-4] for name in names if _KEY_FILE.fullmatch(name))

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The active key as (kid, key), creating the first key if the folder has none."""
        kids = self.kids()
        if not kids:
            ensure_private_dir(self.directory)
            with self._creation_lock():
                kids = self.kids() or [self._create()]
        return kids[0], self._private(kids[0])

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every public key in the folder by kid (never creates one)."""
        return {kid: self._private(kid).public_key() for kid in self.kids()}

    def jwks(self) -> dict[str, Any]:
        """The public keys as an RFC 8037 JSON Web Key Set."""
        return {"keys": [_jwk(kid, key) for kid, key in self.public_keys().items()]}

    @contextmanager
    def _creation_lock(self) -> Iterator[None]:
        fd = os.open(self.directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _create(self) -> str:
        key = Ed25519PrivateKey.generate()
        kid = kid_of(key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        create_private_file(self.directory / f"{kid}.pem", pem)
        log.info("created signing key %s in %s", kid, self.directory)
        return kid

    def _private(self, kid: str) -> Ed25519PrivateKey:
        if kid not in self._cache:
            self._cache[kid] = _load_pem(self.directory / f"{kid}.pem", kid)
        return self._cache[kid]


def public_keys_from_jwks(jwks: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
    """The Ed25519 public keys of a JWKS by kid; anything else in it is a ConfigError."""
    entries = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(entries, list):
        raise ConfigError('JWKS must be a JSON object with a "keys" list')
    return dict(_from_jwk(entry) for entry in entries)


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_pem(path: Path, kid: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load signing key {path}: {type(exc).__name__}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an Ed25519 key")
    # The file name is the kid tokens carry; a renamed file would make them unverifiable.
    if kid_of(key.public_key()) != kid:
        raise ConfigError(f"signing key {path} does not match its kid; do not rename key files")
    return key


def _jwk(kid: str, key: Ed25519PublicKey) -> dict[str, str]:
    x = base64.urlsafe_b64encode(_raw(key)).rstrip(b"=").decode("ascii")
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}


def _from_jwk(entry: Any) -> tuple[str, Ed25519PublicKey]:
    if not isinstance(entry, dict):
        raise ConfigError("JWKS entry is not a JSON object")
    kid = entry.get("kid")
    if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
        raise ConfigError(f"JWKS key {kid!r} is not an Ed25519 (kty OKP, crv Ed25519) key")
    if entry.get("alg", "EdDSA") != "EdDSA" or entry.get("use", "sig") != "sig":
        raise ConfigError(f"JWKS key {kid!r} is not an EdDSA signing key")
    key = Ed25519PublicKey.from_public_bytes(_b64url_32(entry.get("x"), kid))
    if kid != kid_of(key):
        raise ConfigError(f"JWKS key {kid!r} does not match its public key (kid must be its hash)")
    return kid, key


def _b64url_32(x: Any, kid: Any) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f'JWKS key {kid!r}: "x" is not base64url') from exc
    if len(raw) != 32:
        raise ConfigError(f'JWKS key {kid!r}: "x" is not a 32-byte Ed25519 public key')
    return raw
