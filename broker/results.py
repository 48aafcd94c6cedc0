"""Result bytes by job id, reachable only with an unguessable, expiring capability token.

Flow: the service opens a `ResultWriter` when a site starts streaming a result, writes chunks
as they arrive into a temporary file, and `commit`s with the size and sha256 the site reported;
only then is the file renamed into place and a `ResultRef` (with its token) issued. The result
URL `{base}/results/{job_id}/{token}` authorises itself because the client downloads it with no
headers (spec §3.4). Files live under `data_dir` on local disk; object storage would be another
`ResultStore` behind the same protocol.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edif.clock import Clock
from edif.errors import EdifError, NotFound, PayloadTooLarge, ResultExpired

log = logging.getLogger(__name__)

_SUFFIX = ".result"
_PARTIAL = ".part"


class ResultIntegrityError(EdifError):
    """The bytes received differ from what the site said it sent."""

    http_status = 502
    grpc_code = "DATA_LOSS"


@dataclass(frozen=True)
class ResultRef:
    job_id: str
    size: int
    sha256: str
    token: str = field(repr=False)  # the capability: never log it
    expires_at: float


@dataclass(frozen=True)
class ResultFile:
    path: Path
    size: int


class ResultWriter(Protocol):
    @property
    def size(self) -> int: ...

    def write(self, chunk: bytes) -> None: ...

    def commit(self, expected_size: int | None, expected_sha256: str | None) -> ResultRef: ...

    def abort(self) -> None: ...


class ResultStore(Protocol):
    def begin(self, job_id: str) -> ResultWriter: ...

    def put(self, job_id: str, chunks: Iterable[bytes]) -> ResultRef: ...

    def open(self, job_id: str, token: str) -> ResultFile: ...

    def read(self, ref: ResultRef) -> bytes: ...

    def discard(self, job_id: str) -> None:
        """Forget a result and delete its bytes (a refused or withdrawn result)."""
        ...

    def sweep(self) -> int: ...


class DiskResultStore:
    """Results as files in one folder; the token index lives in memory (lost on restart)."""

    def __init__(self, root: Path, clock: Clock, ttl_s: float, max_bytes: int) -> None:
        self._root = Path(root)
        self._clock = clock
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._refs: dict[str, ResultRef] = {}
        self._root.mkdir(parents=True, exist_ok=True)
        self._remove_orphans()

    def begin(self, job_id: str) -> _DiskWriter:
        partial = self._root / f".{job_id}.{secrets.token_hex(4)}{_PARTIAL}"
        return _DiskWriter(job_id, partial, self._max_bytes, self._publish)

    def put(self, job_id: str, chunks: Iterable[bytes]) -> ResultRef:
        writer = self.begin(job_id)
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit(None, None)

    def open(self, job_id: str, token: str) -> ResultFile:
        ref = self._refs.get(job_id)
        if ref is None or not _same(ref.token, token):
            raise NotFound(
                f"No result at this address. Results are kept for {self._ttl_s:g} s "
                "after a job completes; submit the job again."
            )
        if self._clock.now() >= ref.expires_at:
            raise ResultExpired(
                f"This result expired {self._clock.now() - ref.expires_at:.0f} s ago "
                f"(results are kept for {self._ttl_s:g} s); submit the job again."
            )
        return ResultFile(self._path(job_id), ref.size)

    def read(self, ref: ResultRef) -> bytes:
        return self._path(ref.job_id).read_bytes()

    def discard(self, job_id: str) -> None:
        self._refs.pop(job_id, None)
        self._path(job_id).unlink(missing_ok=True)

    def sweep(self) -> int:
        """Delete expired results; returns how many went."""
        now = self._clock.now()
        expired = [job_id for job_id, ref in self._refs.items() if now >= ref.expires_at]
        for job_id in expired:
            del self._refs[job_id]
            self._path(job_id).unlink(missing_ok=True)
        return len(expired)

    def _path(self, job_id: str) -> Path:
        return self._root / f"{job_id}{_SUFFIX}"

    def _publish(self, job_id: str, partial: Path, size: int, sha256: str) -> ResultRef:
        os.replace(partial, self._path(job_id))
        ref = ResultRef(
            job_id=job_id,
            size=size,
            sha256=sha256,
            token=secrets.token_urlsafe(32),
            expires_at=self._clock.now() + self._ttl_s,
        )
        self._refs[job_id] = ref
        return ref

    def _remove_orphans(self) -> None:
        # The index does not survive a restart, so files from an earlier run are unreachable.
        for path in self._root.iterdir():
            if path.name.endswith((_SUFFIX, _PARTIAL)):
                path.unlink(missing_ok=True)


class _DiskWriter:
    def __init__(
        self,
        job_id: str,
        partial: Path,
        max_bytes: int,
        publish: Callable[[str, Path, int, str], ResultRef],
    ) -> None:
        self._job_id = job_id
        self._partial = partial
        self._max_bytes = max_bytes
        self._publish = publish
        self._file = open(self._partial, "wb")  # noqa: SIM115 - closed by commit/abort
        self._hash = hashlib.sha256()
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def write(self, chunk: bytes) -> None:
        if self._size + len(chunk) > self._max_bytes:
            raise PayloadTooLarge(
                f"The result is larger than this broker's limit of {self._max_bytes} bytes; "
                "save fewer or smaller values."
            )
        self._file.write(chunk)
        self._hash.update(chunk)
        self._size += len(chunk)

    def commit(self, expected_size: int | None, expected_sha256: str | None) -> ResultRef:
        self._file.close()
        digest = self._hash.hexdigest()
        if expected_size is not None and expected_size != self._size:
            self.abort()
            raise ResultIntegrityError(
                f"The result was damaged in transit: {self._size} bytes arrived, "
                f"the site sent {expected_size}."
            )
        if expected_sha256 and not _same(expected_sha256.lower(), digest):
            self.abort()
            raise ResultIntegrityError("The result was damaged in transit (sha256 mismatch).")
        return self._publish(self._job_id, self._partial, self._size, digest)

    def abort(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)


def _same(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())
