"""Results as files in one folder on local disk (the default store).

Layout: `<job>.result` (the bytes) and `<job>.meta.json` (its `ResultRecord`). A writer streams
into a hidden `.part` file (flushed to disk every `SYNC_EVERY_BYTES` on the way, so the final
fsync is short); `commit` checks size and sha256, then fsyncs the bytes and a staged record
at the same time, renames both into place (bytes first) and fsyncs the folder.
The record is the commit point, so after a crash (even SIGKILL mid-write) a start finds either
a complete result with its record, or leftovers that it deletes. Every `open` reads the record
from disk: nothing about a result lives only in memory, and a restarted broker serves the same
URLs until they expire.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from broker.results.base import (
    ResultFile,
    ResultRecord,
    ResultRef,
    Tally,
    check_admitted,
    checked_job_id,
    issue,
    put_all,
)
from edif.clock import Clock

log = logging.getLogger(__name__)

_DATA = ".result"
_META = ".meta.json"
_PARTIAL = ".part"
_META_TMP = ".meta.tmp"
_CHECK = ".check"  # broker.result_safety decompresses beside the result to check it
SYNC_EVERY_BYTES = 64 * 1024 * 1024


class DiskResultStore:
    def __init__(
        self, root: Path, clock: Clock, ttl_s: float, max_bytes: int, sync: bool = True
    ) -> None:
        # sync=False: no fsyncs. The write order (bytes, then record, by rename) still holds,
        # so a crash of the broker process leaves a complete result or leftovers; only a power
        # cut can lose a result then. The broker ties this to its job store's durability
        # (`EDIF_BROKER_JOB_STORE_SYNC`): a job recorded COMPLETED never outlives its result.
        self._sync = sync
        self._root = Path(root)
        self._clock = clock
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._root.mkdir(parents=True, exist_ok=True)
        self._remove_orphans()

    def begin(self, job_id: str) -> _DiskWriter:
        checked_job_id(job_id, self._ttl_s)
        partial = self._root / f".{job_id}.{secrets.token_hex(4)}{_PARTIAL}"
        return _DiskWriter(job_id, partial, Tally(self._max_bytes), self._publish, self._sync)

    def put(self, job_id: str, chunks: Iterable[bytes]) -> ResultRef:
        return put_all(self.begin(job_id), chunks)

    def open(self, job_id: str, token: str) -> ResultFile:
        checked_job_id(job_id, self._ttl_s)
        record = self._record(job_id)
        check_admitted(record, job_id, token, self._clock.now(), self._ttl_s)
        assert record is not None
        return ResultFile(self._data(job_id), record.size, record.sha256, record.expires_at)

    def read(self, ref: ResultRef) -> bytes:
        return self._data(ref.job_id).read_bytes()

    @contextmanager
    def local_file(self, ref: ResultRef) -> Iterator[Path]:
        yield self._data(ref.job_id)

    def discard(self, job_id: str) -> None:
        checked_job_id(job_id, self._ttl_s)
        self._delete(job_id)

    def sweep(self) -> int:
        now = self._clock.now()
        gone = 0
        for meta in self._root.glob(f"*{_META}"):
            record = self._load(meta)
            if record is None or now >= record.expires_at:
                self._delete(meta.name.removesuffix(_META))
                gone += 1
        return gone

    # -- layout ------------------------------------------------------------------------------

    def _data(self, job_id: str) -> Path:
        return self._root / f"{job_id}{_DATA}"

    def _meta(self, job_id: str) -> Path:
        return self._root / f"{job_id}{_META}"

    def _record(self, job_id: str) -> ResultRecord | None:
        return self._load(self._meta(job_id))

    def _load(self, meta: Path) -> ResultRecord | None:
        try:
            return ResultRecord.from_json(meta.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("unreadable result record %s: %s", meta.name, error)
            return None

    def _delete(self, job_id: str) -> None:
        # The record first: a crash in between leaves bytes without a record, an orphan.
        self._meta(job_id).unlink(missing_ok=True)
        self._data(job_id).unlink(missing_ok=True)

    def _publish(
        self, job_id: str, partial: Path, size: int, sha256: str, sync_data: Callable[[], None]
    ) -> ResultRef:
        """Make the result durable, then visible: the bytes and the staged record are synced
        at the same time (two fsyncs in the time of about one), and only once both are on
        disk are they renamed into place and the folder synced. A crash before that leaves
        only leftovers; the record still never names bytes that are not on disk."""
        ref, record = issue(job_id, size, sha256, self._clock.now(), self._ttl_s)
        staged = self._root / f".{job_id}.{secrets.token_hex(4)}{_META_TMP}"
        if not self._sync:
            sync_data()  # closes the file (no fsync in this mode)
            staged.write_bytes(record.to_json())
            os.replace(partial, self._data(job_id))
            os.replace(staged, self._meta(job_id))
            return ref
        data_synced = _sync_pool().submit(sync_data)
        try:
            try:
                with staged.open("wb") as handle:
                    handle.write(record.to_json())
                    handle.flush()
                    os.fsync(handle.fileno())
            finally:
                data_synced.result()  # the bytes' fsync (its error, if any) before any rename
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        os.replace(partial, self._data(job_id))
        os.replace(staged, self._meta(job_id))
        _fsync_dir(self._root)
        return ref

    def _remove_orphans(self) -> None:
        """Delete what a crash left: partial writes, bytes without a record, damaged records."""
        removed = 0
        for path in self._root.iterdir():
            name = path.name
            if name.endswith((_PARTIAL, _META_TMP, _CHECK)):
                orphan = True
            elif name.endswith(_DATA):
                orphan = self._load(self._meta(name.removesuffix(_DATA))) is None
            elif name.endswith(_META):
                record = self._load(path)
                orphan = record is None or not self._data(name.removesuffix(_META)).exists()
            else:
                continue
            if orphan:
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d leftover result file(s) from an earlier run", removed)


class _DiskWriter:
    def __init__(
        self,
        job_id: str,
        partial: Path,
        tally: Tally,
        publish: Callable[[str, Path, int, str, Callable[[], None]], ResultRef],
        sync: bool = True,
    ) -> None:
        self._sync = sync
        self.commit_on_loop = not sync  # no fsync: create, write, rename, nothing that waits
        self._job_id = job_id
        self._partial = partial
        self._tally = tally
        self._publish = publish
        self._file = open(self._partial, "wb")  # noqa: SIM115 - closed by commit/abort
        self._unsynced = 0

    @property
    def size(self) -> int:
        return self._tally.size

    def write(self, chunk: bytes) -> None:
        self._tally.add(chunk)
        self._file.write(chunk)
        self._unsynced += len(chunk)
        if self._sync and self._unsynced >= SYNC_EVERY_BYTES:
            # Flush as the result arrives (the caller writes on a thread, broker.results.
            # pipeline), so the fsync in `commit` finds little left to write.
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._unsynced = 0

    def commit(self, expected_size: int | None, expected_sha256: str | None) -> ResultRef:
        try:
            digest = self._tally.verified(expected_size, expected_sha256)
            self._file.flush()
            # The bytes are on disk before the record says so (`_publish` waits for this).
            return self._publish(
                self._job_id, self._partial, self._tally.size, digest, self._sync_and_close
            )
        except BaseException:
            self.abort()
            raise

    def _sync_and_close(self) -> None:
        try:
            if self._sync:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)


_SYNC_POOL: ThreadPoolExecutor | None = None
_SYNC_POOL_LOCK = threading.Lock()


def _sync_pool() -> ThreadPoolExecutor:
    """Threads for the bytes' fsync while the committing thread syncs the record."""
    global _SYNC_POOL
    with _SYNC_POOL_LOCK:
        if _SYNC_POOL is None:
            _SYNC_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="edif-fsync")
        return _SYNC_POOL


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
