"""The signed head checkpoint: the anchor that makes a shortened or re-hashed log visible.

The hash chain alone proves order and integrity *between* entries, but anyone who can write
the database can recompute every hash, or cut the tail off. So after every append the log
writes `head.json` next to the database: the head's seq and hash, signed with the broker's
Ed25519 key (the `KeyStore` signing key, kid in the file). `verify` then insists that the
database ends exactly at the signed head: fewer entries = the tail was removed; more = entries
were appended outside the broker; another hash = the log was rewritten. The signature is over
`canonical({"seq", "hash", "ts"})`. It defends against whoever can write the data dir but not
the key folder; copying head.json off the host (or publishing it) extends that to rollback.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from broker.audit.model import canonical


class Checkpoint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    seq: int
    hash: str
    ts: float
    kid: str
    sig: str

    def signed_part(self) -> bytes:
        return canonical({"seq": self.seq, "hash": self.hash, "ts": self.ts})


def sign(seq: int, hash_: str, ts: float, kid: str, key: Ed25519PrivateKey) -> Checkpoint:
    message = canonical({"seq": seq, "hash": hash_, "ts": ts})
    sig = base64.urlsafe_b64encode(key.sign(message)).decode("ascii")
    return Checkpoint(seq=seq, hash=hash_, ts=ts, kid=kid, sig=sig)


def signature_ok(checkpoint: Checkpoint, public_keys: dict[str, Ed25519PublicKey]) -> bool:
    key = public_keys.get(checkpoint.kid)
    if key is None:
        return False
    try:
        key.verify(base64.urlsafe_b64decode(checkpoint.sig), checkpoint.signed_part())
    except (InvalidSignature, ValueError):
        return False
    return True


def write(path: Path, checkpoint: Checkpoint) -> None:
    """Replace `path` atomically (a reader sees the old head or the new one, never half)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".head.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(checkpoint.model_dump_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: Path) -> Checkpoint | None:
    """The checkpoint in `path`; None when absent. An unreadable file reads as a bad signature."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return Checkpoint.model_validate(json.loads(text))
    except (ValueError, ValidationError):
        return Checkpoint(seq=-1, hash="", ts=0.0, kid="", sig="")
