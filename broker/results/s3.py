"""Results in S3-compatible object storage (AWS S3, MinIO, Ceph RGW ...): the scale option.

Same contract as the disk store, same layout as keys under `prefix`: `<job>.result` (the bytes)
and `<job>.meta.json` (the `ResultRecord`, the commit point). A writer sends the bytes as a
multipart upload in `part_bytes` parts as they arrive (holding one part in memory), checks size
and sha256, and only then completes the upload and writes the record; a result small enough
for one part is a single PUT. The broker still serves the result URL: downloads are streamed
from ranged GETs, so `Range` and resume work the same as on disk.

Several brokers may share a bucket, so leftovers (uploads never completed, bytes without a
record) are only removed once older than `orphan_grace_s` — at start and on every sweep.
Credentials come from the settings (or boto3's usual chain) and are never logged.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.results.base import (
    CHUNK_BYTES,
    ResultFile,
    ResultRecord,
    ResultRef,
    Tally,
    check_admitted,
    checked_job_id,
    issue,
    not_found,
    put_all,
)
from edif.clock import Clock
from edif.errors import Unavailable

if TYPE_CHECKING:
    from broker.config import BrokerSettings

log = logging.getLogger(__name__)

MIN_PART_BYTES = 5 * 1024 * 1024  # S3's smallest part (all but the last)
_DATA = ".result"
_META = ".meta.json"


def s3_client(settings: BrokerSettings) -> Any:
    """A boto3 S3 client for the broker's settings (path-style: works with MinIO and moto)."""
    import boto3
    from botocore.config import Config

    secret = settings.s3_secret_access_key
    key_id = settings.s3_access_key_id
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=key_id.get_secret_value() if key_id else None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}),
    )


class S3ResultStore:
    def __init__(
        self,
        client: Any,
        bucket: str,
        clock: Clock,
        ttl_s: float,
        max_bytes: int,
        *,
        prefix: str = "results/",
        part_bytes: int = 8 * 1024 * 1024,
        orphan_grace_s: float = 3600.0,
        spool_dir: Path | None = None,
    ) -> None:
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes must be at least {MIN_PART_BYTES} (an S3 rule)")
        self._s3 = client
        self._bucket = bucket
        self._clock = clock
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._prefix = prefix
        self._part_bytes = part_bytes
        self._grace_s = orphan_grace_s
        self._spool_dir = spool_dir
        with _reachable():
            self._purge(expired=False)  # damaged records
            self._remove_orphans()

    def begin(self, job_id: str) -> _S3Writer:
        checked_job_id(job_id, self._ttl_s)
        return _S3Writer(self, job_id, Tally(self._max_bytes))

    def put(self, job_id: str, chunks: Iterable[bytes]) -> ResultRef:
        return put_all(self.begin(job_id), chunks)

    def open(self, job_id: str, token: str) -> ResultFile:
        checked_job_id(job_id, self._ttl_s)
        record = self._record(job_id)
        check_admitted(record, job_id, token, self._clock.now(), self._ttl_s)
        assert record is not None
        key = self._data(job_id)
        return ResultFile(
            None,
            record.size,
            record.sha256,
            record.expires_at,
            reader=lambda start, length: self._ranged(key, start, length),
        )

    def read(self, ref: ResultRef) -> bytes:
        return self._s3.get_object(Bucket=self._bucket, Key=self._data(ref.job_id))["Body"].read()

    @contextmanager
    def local_file(self, ref: ResultRef) -> Iterator[Path]:
        with tempfile.NamedTemporaryFile(dir=self._spool_dir, suffix=".result") as handle:
            for chunk in self._ranged(self._data(ref.job_id), 0, ref.size):
                handle.write(chunk)
            handle.flush()
            yield Path(handle.name)

    def discard(self, job_id: str) -> None:
        checked_job_id(job_id, self._ttl_s)
        self._delete(job_id)

    def sweep(self) -> int:
        gone = self._purge(expired=True)
        self._remove_orphans()
        return gone

    def _purge(self, expired: bool) -> int:
        """Delete results whose record is damaged (and, with `expired`, those past expiry)."""
        now = self._clock.now()
        gone = 0
        for key, _ in self._objects(_META):
            job_id = key[len(self._prefix) : -len(_META)]
            record = self._record(job_id)
            if record is None or (expired and now >= record.expires_at):
                self._delete(job_id)
                gone += 1
        return gone

    # -- layout and transfers ----------------------------------------------------------------

    def _data(self, job_id: str) -> str:
        return f"{self._prefix}{job_id}{_DATA}"

    def _meta(self, job_id: str) -> str:
        return f"{self._prefix}{job_id}{_META}"

    def _record(self, job_id: str) -> ResultRecord | None:
        try:
            with _reachable():
                key = self._meta(job_id)
                raw = self._s3.get_object(Bucket=self._bucket, Key=key)["Body"].read()
        except self._s3.exceptions.NoSuchKey:
            return None
        try:
            return ResultRecord.from_json(raw)
        except ValueError as error:
            log.warning("unreadable result record for a job: %s", error)
            return None

    def _ranged(self, key: str, start: int, length: int) -> Iterator[bytes]:
        if length <= 0:
            return iter(())
        try:
            with _reachable():
                body = self._s3.get_object(
                    Bucket=self._bucket, Key=key, Range=f"bytes={start}-{start + length - 1}"
                )["Body"]
        except self._s3.exceptions.NoSuchKey:
            raise not_found(self._ttl_s) from None
        return _closing(body)

    def _delete(self, job_id: str) -> None:
        # The record first: a crash in between leaves bytes without a record, an orphan.
        self._s3.delete_object(Bucket=self._bucket, Key=self._meta(job_id))
        self._s3.delete_object(Bucket=self._bucket, Key=self._data(job_id))

    def _objects(self, suffix: str) -> Iterator[tuple[str, datetime]]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=self._prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                if item["Key"].endswith(suffix):
                    yield item["Key"], item["LastModified"]

    def _remove_orphans(self) -> None:
        """Abort stale uploads; delete stale bytes without a record and records without bytes."""
        removed = 0
        data = dict(self._objects(_DATA))
        metas = {key for key, _ in self._objects(_META)}
        for key, modified in data.items():
            job_id = key[len(self._prefix) : -len(_DATA)]
            if self._meta(job_id) not in metas and self._stale(modified):
                self._s3.delete_object(Bucket=self._bucket, Key=key)
                removed += 1
        for key in metas:
            job_id = key[len(self._prefix) : -len(_META)]
            if self._data(job_id) not in data:
                self._s3.delete_object(Bucket=self._bucket, Key=key)
                removed += 1
        pages = self._s3.get_paginator("list_multipart_uploads").paginate(
            Bucket=self._bucket, Prefix=self._prefix
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                if self._stale(upload["Initiated"]):
                    self._s3.abort_multipart_upload(
                        Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    removed += 1
        if removed:
            log.info("removed %d leftover result object(s) or upload(s)", removed)

    def _stale(self, when: datetime) -> bool:
        stamp = when if when.tzinfo else when.replace(tzinfo=UTC)
        return self._clock.now() - stamp.timestamp() >= self._grace_s

    # -- used by the writer ------------------------------------------------------------------

    def _publish(self, job_id: str, size: int, sha256: str) -> ResultRef:
        ref, record = issue(job_id, size, sha256, self._clock.now(), self._ttl_s)
        self._s3.put_object(
            Bucket=self._bucket,
            Key=self._meta(job_id),
            Body=record.to_json(),
            ContentType="application/json",
        )
        return ref


class _S3Writer:
    commit_on_loop = False  # completing a multipart upload is a network round trip

    def __init__(self, store: S3ResultStore, job_id: str, tally: Tally) -> None:
        self._store = store
        self._s3 = store._s3
        self._bucket = store._bucket
        self._key = store._data(job_id)
        self._job_id = job_id
        self._tally = tally
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    @property
    def size(self) -> int:
        return self._tally.size

    def write(self, chunk: bytes) -> None:
        self._tally.add(chunk)
        self._buffer += chunk
        part = self._store._part_bytes
        while len(self._buffer) >= part:
            self._send_part(bytes(self._buffer[:part]))
            del self._buffer[:part]

    def commit(self, expected_size: int | None, expected_sha256: str | None) -> ResultRef:
        try:
            digest = self._tally.verified(expected_size, expected_sha256)
            if self._upload_id is None:
                self._s3.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
            else:
                if self._buffer or not self._parts:
                    self._send_part(bytes(self._buffer))
                self._s3.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
                self._upload_id = None
            self._buffer = bytearray()
            return self._store._publish(self._job_id, self._tally.size, digest)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            self._s3.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=upload_id)

    def _send_part(self, data: bytes) -> None:
        if self._upload_id is None:
            created = self._s3.create_multipart_upload(
                Bucket=self._bucket, Key=self._key, ContentType="application/octet-stream"
            )
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        sent = self._s3.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
        )
        self._parts.append({"PartNumber": number, "ETag": sent["ETag"]})


@contextmanager
def _reachable() -> Iterator[None]:
    """Object-store trouble (other than a missing key) is a 503 that says what to do."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise
        log.warning("result store error: %s", error.response.get("Error", {}).get("Code"))
        raise Unavailable("The result store cannot be reached; try again shortly.") from None
    except BotoCoreError as error:
        log.warning("result store unreachable: %s", type(error).__name__)
        raise Unavailable("The result store cannot be reached; try again shortly.") from None


def _closing(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK_BYTES)
    finally:
        body.close()
