"""What every result store shares: the interface, the capability, the metadata record.

A result is two things in a store: its bytes, and a small JSON metadata record (size, sha256,
expiry, and the *hash* of the capability token). Writing the record is the commit point: bytes
without a record are an orphan of a crash and are deleted, a record is only written once its
bytes are complete and checked. The token itself is handed out once, in the `ResultRef`, and
compared against the stored hash in constant time, so a copy of the store grants no downloads.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edif.errors import EdifError, NotFound, PayloadTooLarge, ResultExpired

CHUNK_BYTES = 1024 * 1024  # one read from the store while streaming a download
_FORMAT = 1
# Job ids become file names and object keys: anything else cannot be ours (spec: token_urlsafe).
_JOB_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


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


RangeReader = Callable[[int, int], Iterator[bytes]]


@dataclass(frozen=True)
class ResultFile:
    """A committed result a download may stream: local `path` (disk) or a ranged `reader`."""

    path: Path | None
    size: int
    sha256: str = ""
    expires_at: float = 0.0
    reader: RangeReader | None = field(default=None, repr=False, compare=False)

    @property
    def etag(self) -> str:
        """A strong entity tag: the content's sha256, so equal tags mean equal bytes."""
        return f'"{self.sha256}"'

    def chunks(self, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Bytes `start .. start+length` in chunks; the source is opened before this returns."""
        length = self.size - start if length is None else length
        if self.reader is not None:
            return self.reader(start, length)
        if self.path is None:
            raise NotFound("This result has no readable source.")
        return file_chunks(self.path, start, length)


class ResultWriter(Protocol):
    # True when `commit` is only a few local file operations (no fsync, no network), so a
    # small result may be committed on the event loop instead of paying a hop to a thread.
    commit_on_loop: bool

    @property
    def size(self) -> int: ...

    def write(self, chunk: bytes) -> None: ...

    def commit(self, expected_size: int | None, expected_sha256: str | None) -> ResultRef: ...

    def abort(self) -> None: ...


class ResultStore(Protocol):
    def begin(self, job_id: str) -> ResultWriter: ...

    def put(self, job_id: str, chunks: Iterable[bytes]) -> ResultRef: ...

    def open(self, job_id: str, token: str) -> ResultFile:
        """The committed result behind a URL, or `NotFound` / `ResultExpired`."""
        ...

    def read(self, ref: ResultRef) -> bytes: ...

    def local_file(self, ref: ResultRef) -> AbstractContextManager[Path]:
        """A local file with the result's bytes for as long as the context lasts (checks)."""
        ...

    def discard(self, job_id: str) -> None:
        """Forget a result and delete its bytes (a refused or withdrawn result)."""
        ...

    def sweep(self) -> int:
        """Delete expired results (and old orphans); returns how many results went."""
        ...


@dataclass(frozen=True)
class ResultRecord:
    """The committed metadata of one result, as stored beside its bytes."""

    job_id: str
    size: int
    sha256: str
    token_sha256: str
    created_at: float
    expires_at: float

    def to_json(self) -> bytes:
        return json.dumps({"format": _FORMAT, **self.__dict__}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ResultRecord:
        """Parse a record; `ValueError` for anything damaged or from another format."""
        try:
            data = json.loads(raw)
            if data.pop("format") != _FORMAT:
                raise ValueError("unknown result record format")
            record = cls(**data)
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as error:
            raise ValueError(f"damaged result record: {type(error).__name__}") from error
        numbers = (record.created_at, record.expires_at)
        texts = (record.job_id, record.sha256, record.token_sha256)
        if (
            type(record.size) is not int
            or not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
            or not all(isinstance(t, str) for t in texts)
        ):
            raise ValueError("damaged result record (field types)")
        return record

    def admits(self, job_id: str, token: str) -> bool:
        return self.job_id == job_id and _same(self.token_sha256, token_hash(token))


def issue(
    job_id: str, size: int, sha256: str, now: float, ttl_s: float
) -> tuple[ResultRef, ResultRecord]:
    """A fresh capability for a committed result: the ref (with the token) and its record."""
    token = secrets.token_urlsafe(32)
    expires_at = now + ttl_s
    ref = ResultRef(job_id=job_id, size=size, sha256=sha256, token=token, expires_at=expires_at)
    record = ResultRecord(job_id, size, sha256, token_hash(token), now, expires_at)
    return ref, record


def token_hash(token: str) -> str:
    # Tokens carry 256 random bits, so a plain hash is as strong as a slow one here.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def checked_job_id(job_id: str, ttl_s: float) -> str:
    """`job_id` if it can name a stored result; otherwise the same 404 as an unknown one."""
    if not _JOB_ID.match(job_id):
        raise not_found(ttl_s)
    return job_id


def check_admitted(
    record: ResultRecord | None, job_id: str, token: str, now: float, ttl_s: float
) -> ResultRecord:
    """The record if `token` opens it and it has not expired; else `NotFound`/`ResultExpired`."""
    if record is None or not record.admits(job_id, token):
        raise not_found(ttl_s)
    if now >= record.expires_at:
        raise ResultExpired(
            f"This result expired {now - record.expires_at:.0f} s ago "
            f"(results are kept for {ttl_s:g} s); submit the job again."
        )
    return record


def not_found(ttl_s: float) -> NotFound:
    return NotFound(
        f"No result at this address. Results are kept for {ttl_s:g} s "
        "after a job completes; submit the job again."
    )


class Tally:
    """Size and sha256 of the bytes written so far, the size cap, and the commit-time check."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self.size = 0

    def add(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self._max_bytes:
            raise PayloadTooLarge(
                f"The result is larger than this broker's limit of {self._max_bytes} bytes; "
                "save fewer or smaller values."
            )
        self._hash.update(chunk)
        self.size += len(chunk)

    def verified(self, expected_size: int | None, expected_sha256: str | None) -> str:
        """The sha256, after checking what the site said it sent (`ResultIntegrityError`)."""
        digest = self._hash.hexdigest()
        if expected_size is not None and expected_size != self.size:
            raise ResultIntegrityError(
                f"The result was damaged in transit: {self.size} bytes arrived, "
                f"the site sent {expected_size}."
            )
        if expected_sha256 and not _same(expected_sha256.lower(), digest):
            raise ResultIntegrityError("The result was damaged in transit (sha256 mismatch).")
        return digest


def put_all(writer: ResultWriter, chunks: Iterable[bytes]) -> ResultRef:
    try:
        for chunk in chunks:
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.commit(None, None)


def file_chunks(path: Path, start: int, length: int) -> Iterator[bytes]:
    # Opened here, not in the generator: a missing file is a 404 before any header is sent,
    # and a result discarded mid-download still streams from the open descriptor.
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise NotFound("No result at this address (it was removed).") from None
    handle.seek(start)
    return _drain(handle, length)


def _drain(handle, length: int) -> Iterator[bytes]:  # noqa: ANN001 - a binary file
    with handle:
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                raise OSError("result file is shorter than its record")
            remaining -= len(chunk)
            yield chunk


def _same(expected: str, given: str) -> bool:
    return hmac.compare_digest(
        expected.encode("utf-8", "surrogatepass"), given.encode("utf-8", "surrogatepass")
    )
