"""BackgroundWriter: a result's chunks written in order on one thread, the same checks as before."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from broker.results import DiskResultStore, ResultIntegrityError, ResultRef
from broker.results.pipeline import BackgroundWriter
from edif.clock import FakeClock
from edif.errors import PayloadTooLarge


def _store(root: Path, max_bytes: int = 1 << 30) -> DiskResultStore:
    return DiskResultStore(root, FakeClock(), ttl_s=3600, max_bytes=max_bytes)


class RecordingWriter:
    """A ResultWriter that records what happened, on which thread, and can be held up."""

    commit_on_loop = False

    def __init__(self, fail_at: int | None = None) -> None:
        self.events: list[tuple[str, bytes | None]] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.release.set()
        self.fail_at = fail_at

    @property
    def size(self) -> int:
        return sum(len(c or b"") for kind, c in self.events if kind == "write")

    def write(self, chunk: bytes) -> None:
        self.release.wait(5)
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and len(self.events) == self.fail_at:
            raise OSError("disk full")
        self.events.append(("write", chunk))

    def commit(self, expected_size: int | None, expected_sha256: str | None) -> ResultRef:
        self.events.append(("commit", None))
        return ResultRef("j", self.size, "", "t", 0.0)

    def abort(self) -> None:
        self.events.append(("abort", None))


async def test_large_chunks_land_in_order_off_the_loop_and_commit_checks_them(tmp_path) -> None:
    store = _store(tmp_path)
    writer = BackgroundWriter(lambda: store.begin("job1"), max_pending_bytes=3000, inline_bytes=100)
    chunks = [bytes([i]) * (500 + i) for i in range(40)]
    for chunk in chunks:
        await writer.write(chunk)
    whole = b"".join(chunks)
    ref, _ = await writer.commit(len(whole), hashlib.sha256(whole).hexdigest())
    assert ref.size == len(whole) and ref.sha256 == hashlib.sha256(whole).hexdigest()
    assert store.read(ref) == whole


async def test_what_follows_the_commit_runs_after_it_off_the_loop_and_is_returned() -> None:
    fake = RecordingWriter()
    writer = BackgroundWriter(lambda: fake, inline_bytes=10)
    await writer.write(b"x" * 100)
    seen: list[tuple[ResultRef, str, list]] = []

    def then(ref: ResultRef) -> str:
        seen.append((ref, threading.current_thread().name, list(fake.events)))
        return "checked"

    ref, value = await writer.commit(None, None, then=then)
    assert value == "checked" and seen[0][0] is ref
    assert seen[0][2][-1] == ("commit", None)  # after the commit, never before
    assert seen[0][1] != threading.current_thread().name


async def test_chunks_go_to_one_thread_not_the_event_loop() -> None:
    fake = RecordingWriter()
    writer = BackgroundWriter(lambda: fake, inline_bytes=10)
    for i in range(5):
        await writer.write(bytes([i]) * 100)
    await writer.commit(None, None)
    assert [c for kind, c in fake.events if kind == "write"] == [bytes([i]) * 100 for i in range(5)]
    assert fake.events[-1] == ("commit", None)
    assert len(fake.threads) == 1 and threading.current_thread().name not in fake.threads


async def test_small_results_are_written_on_the_spot() -> None:
    fake = RecordingWriter()
    writer = BackgroundWriter(lambda: fake, inline_bytes=1000)
    await writer.write(b"abc")
    assert fake.events == [("write", b"abc")]  # already written: no thread involved
    assert fake.threads == {threading.current_thread().name}
    await writer.commit(3, None)


async def test_the_size_cap_still_refuses_a_result_and_nothing_is_published(tmp_path) -> None:
    store = _store(tmp_path, max_bytes=1000)
    writer = BackgroundWriter(lambda: store.begin("job1"), inline_bytes=10)
    with pytest.raises(PayloadTooLarge):
        for _ in range(5):
            await writer.write(b"x" * 400)
        await writer.commit(2000, None)
    writer.abort()
    writer.abort()  # idempotent
    _threads_done()
    assert not list(tmp_path.iterdir())  # no partial file, no record


async def test_a_damaged_result_is_refused_at_commit(tmp_path) -> None:
    store = _store(tmp_path)
    writer = BackgroundWriter(lambda: store.begin("job1"), inline_bytes=10)
    await writer.write(b"y" * 100)
    with pytest.raises(ResultIntegrityError):
        await writer.commit(100, hashlib.sha256(b"other").hexdigest())
    writer.abort()
    assert not list(tmp_path.iterdir())


async def test_a_failed_write_fails_the_commit() -> None:
    fake = RecordingWriter(fail_at=1)
    writer = BackgroundWriter(lambda: fake, inline_bytes=10)
    with pytest.raises(OSError, match="disk full"):
        for _ in range(3):
            await writer.write(b"z" * 100)
        await writer.commit(None, None)
    writer.abort()
    _threads_done()
    assert ("commit", None) not in fake.events
    assert fake.events[-1] == ("abort", None)


async def test_abort_runs_after_the_write_in_progress_and_cancels_the_rest() -> None:
    fake = RecordingWriter()
    fake.release.clear()  # the thread is stuck in the first write
    writer = BackgroundWriter(lambda: fake, inline_bytes=10)
    for i in range(4):
        await writer.write(bytes([i]) * 100)
    writer.abort()
    fake.release.set()
    _threads_done()
    assert fake.events[-1] == ("abort", None)
    writes = [c for kind, c in fake.events if kind == "write"]
    assert len(writes) <= 1  # at most the write already in progress; none after the abort


async def test_backpressure_waits_for_the_thread() -> None:
    fake = RecordingWriter()
    writer = BackgroundWriter(lambda: fake, max_pending_bytes=250, inline_bytes=10)
    for i in range(10):
        await writer.write(bytes([i]) * 100)
        assert writer._pending_bytes <= 250
    await writer.commit(None, None)
    assert len([1 for kind, _ in fake.events if kind == "write"]) == 10


def _threads_done() -> None:
    """Wait until the writers' threads have run what was queued (an abort runs last)."""
    for thread in threading.enumerate():
        if thread.name.startswith("edif-result"):
            thread.join(5)


@pytest.mark.parametrize("sync", [False, True], ids=["no-fsync", "fsync"])
async def test_a_small_result_commits_on_the_loop_only_where_commit_waits_for_nothing(
    tmp_path, sync
) -> None:
    store = DiskResultStore(tmp_path, FakeClock(), ttl_s=3600, max_bytes=1 << 20, sync=sync)
    writer = BackgroundWriter(lambda: store.begin("job1"))
    await writer.write(b"small result")
    ref, thread = await writer.commit(12, None, then=lambda ref: threading.current_thread().name)
    on_loop = thread == threading.current_thread().name
    assert on_loop is (not sync)
    assert store.read(ref) == b"small result"
