"""Ed25519 signing keys on disk, their rotation, and their public half as a JWKS.

A `KeyStore` is a private folder (0700) of PKCS8 PEM files named `<kid>.pem` (0600), where the
kid is the first 16 hex digits of sha256 over the raw public key, and `keys.json` beside them:
one `KeyRecord` per key (created, superseded, retire_at). Which key signs and which keys verify
at time t is decided by the pure functions of `auth.rotation` over those records and the
injected clock, so a rotation or a grace period ending takes effect in every process that
holds a KeyStore on its next call, without a restart. The token issuer asks the store for the
signing key; verifiers ask it for the live public keys by kid, or read the same keys from the
JWKS it publishes (`jwks()` here, `public_keys_from_jwks()` on the other side).

Flow: the first `signing_key()` on an empty folder creates a key; `rotate(grace_s)` adds a new
signing key and gives the previous ones `grace_s` to keep verifying; `retire(kid)` ends a key
at once (retiring the signing key rotates first). Every change holds an exclusive flock on
`<dir>/.lock` (the broker and the CLI share the folder), writes the PEM first (temp file
hard-linked into place: never half a file, never an overwrite) and then `keys.json` (temp
file, fsync, rename, fsync of the folder): the rename is the commit. A crash in between leaves
a PEM with no record, which is ignored ("untracked" in `edif key list`): it never signed.
Readers never lock; they re-read `keys.json` when its stat changes.

A folder without `keys.json` (made before rotation, or keys copied in by hand) keeps the old
rule: every PEM verifies and the lexicographically first kid signs; the first rotation or
retirement writes `keys.json` describing exactly that, then changes it.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
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
from pydantic import ValidationError

from auth import rotation
from auth.rotation import KeyRecord, KeyState
from edif.clock import Clock, SystemClock
from edif.config import edif_home
from edif.errors import ConfigError, NotFound

log = logging.getLogger(__name__)

_KEY_FILE = re.compile(r"[0-9a-f]{16}\.pem")
_LOCK_FILE = ".lock"
META_FILE = "keys.json"


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
    tmp = _synced_temp(path, data)
    try:
        # link, not rename: rename would silently replace a file another process made.
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _synced_temp(path: Path, data: bytes) -> str:
    """A new 0600 file beside `path` holding `data`, on disk (fsynced); the caller places it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


class KeyStore:
    """A folder of Ed25519 signing keys, addressed by kid, with their rotation records."""

    def __init__(self, directory: Path, clock: Clock | None = None) -> None:
        self.directory = Path(directory)
        self._clock = clock or SystemClock()
        self._cache: dict[str, Ed25519PrivateKey] = {}
        self._meta_seen: tuple[int, int, int] | None = None  # (ino, mtime_ns, size) parsed
        self._meta: dict[str, KeyRecord] | None = None  # None: no keys.json (legacy folder)

    @classmethod
    def default(cls, clock: Clock | None = None) -> KeyStore:
        """The store under `$EDIF_HOME/keys`."""
        return cls(edif_home() / "keys", clock)

    def __repr__(self) -> str:
        return f"KeyStore({str(self.directory)!r})"

    def kids(self) -> list[str]:
        """The kids of every key file in the folder, sorted; empty if the folder does not exist."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(name[:-4] for name in names if _KEY_FILE.fullmatch(name))

    def records(self) -> dict[str, KeyRecord]:
        """The records of the keys that count: those in keys.json whose PEM exists.

        A legacy folder (no keys.json) gets one record per PEM, all created at 0 with no
        deadline: every key verifies and the first kid signs, as before rotation existed.
        """
        files = set(self.kids())
        meta = self._read_meta()
        if meta is None:
            return {kid: KeyRecord(kid=kid, created_at=0.0) for kid in sorted(files)}
        return {kid: record for kid, record in meta.items() if kid in files}

    def untracked(self) -> list[str]:
        """PEMs that keys.json does not name (a crash mid-rotation, or copied in by hand)."""
        meta = self._read_meta()
        return [] if meta is None else [kid for kid in self.kids() if kid not in meta]

    def states(self) -> dict[str, KeyState]:
        """Each counted key's state now (active, grace, retired)."""
        return rotation.key_states(self.records().values(), self._clock.now())

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The active key as (kid, key), creating a key if no live one exists."""
        kid = rotation.signing_kid(self.records().values(), self._clock.now())
        if kid is None:
            ensure_private_dir(self.directory)
            with self._lock():
                records = self.records()
                kid = rotation.signing_kid(records.values(), self._clock.now())
                if kid is None:
                    kid = self._create()
                    now = self._clock.now()
                    self._write_meta({**records, kid: KeyRecord(kid=kid, created_at=now)})
        return kid, self._private(kid)

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every public key that verifies now (active and grace) by kid (never creates one)."""
        live = rotation.verifying_kids(self.records().values(), self._clock.now())
        return {kid: self._private(kid).public_key() for kid in sorted(live)}

    def public_keys_at(self, ts: float) -> dict[str, Ed25519PublicKey]:
        """The public keys that verified at time `ts` (created by then, not yet retired).

        For signatures that must stay checkable after a rotation, such as the audit log's
        signed head: a key retired since still attests what it signed while it was live, and
        a stolen retired key cannot sign for a later time."""
        valid = [
            kid
            for kid, record in self.records().items()
            if record.created_at <= ts and (record.retire_at is None or ts < record.retire_at)
        ]
        return {kid: self._private(kid).public_key() for kid in sorted(valid)}

    def jwks(self) -> dict[str, Any]:
        """The public keys that verify now, as an RFC 8037 JSON Web Key Set."""
        return {"keys": [_jwk(kid, key) for kid, key in self.public_keys().items()]}

    def rotate(self, grace_s: float) -> str:
        """Make a new signing key; the previous live keys keep verifying for `grace_s`."""
        ensure_private_dir(self.directory)
        with self._lock():
            records = self.records()
            kid = self._create()
            self._write_meta(rotation.rotated(records, kid, self._clock.now(), grace_s))
        log.info("rotated signing key: %s signs now, previous keys retire in %ss", kid, grace_s)
        return kid

    def retire(self, kid: str, grace_s: float = 0.0) -> str | None:
        """Stop `kid` verifying now. Retiring the signing key first rotates to a new one
        (other keys get `grace_s`); returns that new kid, or None if no rotation was needed."""
        ensure_private_dir(self.directory)
        with self._lock():
            records = self.records()
            if kid not in records:
                raise NotFound(f"no key {kid!r} in {self.directory} (see `edif key list`)")
            now = self._clock.now()
            new_kid = None
            if rotation.signing_kid(records.values(), now) == kid:
                new_kid = self._create()
                records = rotation.rotated(records, new_kid, now, grace_s)
            self._write_meta(rotation.retired(records, kid, now))
        log.warning("retired signing key %s", kid)
        return new_kid

    @contextmanager
    def _lock(self) -> Iterator[None]:
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

    def _read_meta(self) -> dict[str, KeyRecord] | None:
        path = self.directory / META_FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            self._meta_seen, self._meta = None, None
            return None
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._meta_seen:
            self._meta = _parse_meta(path)
            self._meta_seen = seen
        return self._meta

    def _write_meta(self, records: dict[str, KeyRecord]) -> None:
        document = {
            "version": 1,
            "keys": [records[kid].model_dump(mode="json") for kid in sorted(records)],
        }
        data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
        replace_private_file(self.directory / META_FILE, data)
        self._meta_seen = None  # re-read on next use (a cheap stat + parse)


def replace_private_file(path: Path, data: bytes) -> None:
    """Replace `path` (0600) with `data` atomically and durably: readers see old or new."""
    tmp = _synced_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _parse_meta(path: Path) -> dict[str, KeyRecord]:
    try:
        document = json.loads(path.read_text())
        records = [KeyRecord.model_validate(entry) for entry in document["keys"]]
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ConfigError(
            f"cannot read key records {path}: {type(exc).__name__}; restore it from a backup "
            "(deleting it makes every key file verify again)"
        ) from exc
    return {record.kid: record for record in records}


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
