"""Result store: bytes behind an unguessable, expiring capability."""

from __future__ import annotations

import hashlib

import pytest

from broker.results import DiskResultStore, ResultIntegrityError
from edif.clock import FakeClock
from edif.errors import NotFound, PayloadTooLarge, ResultExpired


@pytest.fixture
def store(tmp_path, clock: FakeClock) -> DiskResultStore:
    return DiskResultStore(tmp_path / "results", clock, ttl_s=3600, max_bytes=1000)


def test_put_then_open_with_the_token(store: DiskResultStore) -> None:
    ref = store.put("job1", [b"abc", b"def"])
    assert ref.size == 6
    assert ref.sha256 == hashlib.sha256(b"abcdef").hexdigest()
    assert len(ref.token) >= 40
    opened = store.open("job1", ref.token)
    assert opened.path.read_bytes() == b"abcdef" and opened.size == 6
    assert store.read(ref) == b"abcdef"
    assert ref.token not in repr(ref)


def test_wrong_token_or_job_is_not_found(store: DiskResultStore) -> None:
    ref = store.put("job1", [b"abc"])
    other = store.put("job2", [b"xyz"])
    for job_id, token in [("job1", "guess"), ("job1", other.token), ("job3", ref.token)]:
        with pytest.raises(NotFound) as caught:
            store.open(job_id, token)
        assert caught.value.http_status == 404
    with pytest.raises(NotFound):
        store.open("job1", "é")  # non-ASCII does not crash the comparison


def test_expiry_is_410_then_swept(store: DiskResultStore, clock: FakeClock, tmp_path) -> None:
    ref = store.put("job1", [b"abc"])
    clock.advance(3599)
    store.open("job1", ref.token)
    clock.advance(2)
    with pytest.raises(ResultExpired) as caught:
        store.open("job1", ref.token)
    assert caught.value.http_status == 410
    assert "3600 s" in caught.value.message
    assert store.sweep() == 1
    assert list((tmp_path / "results").iterdir()) == []
    with pytest.raises(NotFound):
        store.open("job1", ref.token)


def test_integrity_checks_leave_nothing_behind(store: DiskResultStore, tmp_path) -> None:
    writer = store.begin("job1")
    writer.write(b"abc")
    with pytest.raises(ResultIntegrityError, match="sha256"):
        writer.commit(3, "0" * 64)
    writer = store.begin("job2")
    writer.write(b"abc")
    with pytest.raises(ResultIntegrityError, match="3 bytes arrived"):
        writer.commit(4, None)
    assert list((tmp_path / "results").iterdir()) == []


def test_size_limit(store: DiskResultStore, tmp_path) -> None:
    with pytest.raises(PayloadTooLarge):
        store.put("job1", [b"x" * 600, b"x" * 600])
    assert list((tmp_path / "results").iterdir()) == []


def test_leftovers_of_an_earlier_run_are_removed(tmp_path, clock: FakeClock) -> None:
    first = DiskResultStore(tmp_path / "results", clock, 3600, 1000)
    first.put("job1", [b"abc"])
    first.begin("job2").write(b"partial")
    DiskResultStore(tmp_path / "results", clock, 3600, 1000)
    assert [p for p in (tmp_path / "results").iterdir()] == []
