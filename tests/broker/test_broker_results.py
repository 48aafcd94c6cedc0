"""Result store: bytes behind an unguessable, expiring capability, durable across restarts.

Every test runs against both stores (`backend`): local disk, and S3 on moto's real S3 API.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import result_backends
from result_backends import PART, DiskBackend, S3Backend

from broker.results import ResultIntegrityError
from edif.clock import FakeClock
from edif.errors import NotFound, PayloadTooLarge, ResultExpired

backend = result_backends.backend  # the store under test, once per implementation
s3_client = result_backends.s3_client


def test_put_then_open_with_the_token(backend, clock: FakeClock) -> None:
    store = backend.store(clock)
    ref = store.put("job1", [b"abc", b"def"])
    assert ref.size == 6
    assert ref.sha256 == hashlib.sha256(b"abcdef").hexdigest()
    assert len(ref.token) >= 40
    opened = store.open("job1", ref.token)
    assert opened.size == 6 and opened.sha256 == ref.sha256
    assert opened.expires_at == ref.expires_at == clock.now() + 3600
    assert opened.etag == f'"{ref.sha256}"'
    assert b"".join(opened.chunks()) == b"abcdef"
    assert b"".join(opened.chunks(2, 3)) == b"cde"
    assert b"".join(opened.chunks(6, 0)) == b""
    assert store.read(ref) == b"abcdef"
    with store.local_file(ref) as path:
        assert path.read_bytes() == b"abcdef"
    assert ref.token not in repr(ref)


def test_wrong_token_or_job_is_not_found(backend, clock: FakeClock) -> None:
    store = backend.store(clock)
    ref = store.put("job1", [b"abc"])
    other = store.put("job2", [b"xyz"])
    attempts = [("job1", "guess"), ("job1", other.token), ("job3", ref.token), ("job1", "é")]
    attempts += [("../job1", ref.token), ("", ref.token), (".meta", ref.token)]
    for job_id, token in attempts:
        with pytest.raises(NotFound) as caught:
            store.open(job_id, token)
        assert caught.value.http_status == 404
        assert "Results are kept for 3600 s" in caught.value.message


def test_the_token_is_stored_only_as_its_hash(backend, clock: FakeClock) -> None:
    ref = backend.store(clock).put("job1", [b"abc"])
    stored = b"".join(backend.raw(name) for name in backend.leftovers())
    assert ref.token.encode() not in stored
    assert hashlib.sha256(ref.token.encode()).hexdigest().encode() in stored


def test_expiry_is_410_then_swept(backend, clock: FakeClock) -> None:
    store = backend.store(clock)
    ref = store.put("job1", [b"abc"])
    clock.advance(3599)
    store.open("job1", ref.token)
    clock.advance(2)
    with pytest.raises(ResultExpired) as caught:
        store.open("job1", ref.token)
    assert caught.value.http_status == 410
    assert "3600 s" in caught.value.message and "submit the job again" in caught.value.message
    assert store.sweep() == 1
    assert backend.leftovers() == []
    with pytest.raises(NotFound):
        store.open("job1", ref.token)


def test_sweep_keeps_what_has_not_expired(backend, clock: FakeClock) -> None:
    store = backend.store(clock)
    old = store.put("old", [b"abc"])
    clock.advance(1800)
    young = store.put("young", [b"xyz"])
    clock.advance(1801)
    assert store.sweep() == 1
    assert b"".join(store.open("young", young.token).chunks()) == b"xyz"
    with pytest.raises(NotFound):
        store.open("old", old.token)


def test_integrity_checks_leave_nothing_behind(backend, clock: FakeClock) -> None:
    store = backend.store(clock, max_bytes=4 * PART)
    writer = store.begin("job1")
    writer.write(b"abc")
    with pytest.raises(ResultIntegrityError, match="sha256"):
        writer.commit(3, "0" * 64)
    writer = store.begin("job2")
    writer.write(b"abc")
    with pytest.raises(ResultIntegrityError, match="3 bytes arrived"):
        writer.commit(4, None)
    writer = store.begin("job3")  # several parts already uploaded to object storage
    writer.write(os.urandom(2 * PART + 10))
    with pytest.raises(ResultIntegrityError, match="sha256"):
        writer.commit(2 * PART + 10, "f" * 64)
    assert backend.leftovers() == []


def test_a_site_checksum_that_matches_is_accepted(backend, clock: FakeClock) -> None:
    store = backend.store(clock)
    writer = store.begin("job1")
    writer.write(b"abc")
    assert writer.size == 3
    digest = hashlib.sha256(b"abc").hexdigest()
    assert writer.commit(3, digest.upper()).sha256 == digest


def test_size_limit(backend, clock: FakeClock) -> None:
    store = backend.store(clock)
    with pytest.raises(PayloadTooLarge, match="limit of 1000 bytes"):
        store.put("job1", [b"x" * 600, b"x" * 600])
    assert backend.leftovers() == []


def test_large_result_in_parts_round_trips(backend, clock: FakeClock) -> None:
    store = backend.store(clock, max_bytes=4 * PART)
    blob = os.urandom(2 * PART + 12345)
    pieces = [blob[i : i + 65536] for i in range(0, len(blob), 65536)]
    ref = store.put("big", pieces)
    assert ref.sha256 == hashlib.sha256(blob).hexdigest()
    opened = store.open("big", ref.token)
    assert b"".join(opened.chunks()) == blob
    assert b"".join(opened.chunks(PART - 5, 10)) == blob[PART - 5 : PART + 5]
    assert store.read(ref) == blob


def test_a_committed_result_survives_a_restart(backend, clock: FakeClock) -> None:
    ref = backend.store(clock).put("job1", [b"abc"])
    restarted = backend.store(clock)
    opened = restarted.open("job1", ref.token)
    assert b"".join(opened.chunks()) == b"abc" and opened.sha256 == ref.sha256
    assert restarted.read(ref) == b"abc"
    clock.advance(3601)
    with pytest.raises(ResultExpired):  # the expiry survives too
        backend.store(clock).open("job1", ref.token)


def test_leftovers_of_a_crash_are_removed_at_start(backend, clock: FakeClock) -> None:
    first = backend.store(clock, max_bytes=4 * PART)
    kept = first.put("job1", [b"abc"])
    kept_names = backend.leftovers()
    kept_record = backend.raw("job1.meta.json")
    crashed = first.begin("job2")  # never committed nor aborted: the broker died
    crashed.write(os.urandom(PART + 1))
    backend.plant("job3.result", b"bytes whose record was never written")
    backend.plant("job4.meta.json", b"{not json")
    backend.plant("job5.result", b"abc")
    backend.plant("job5.meta.json", kept_record.replace(b'"size": 3', b'"size": "3"'))
    assert len(backend.leftovers()) > len(kept_names)
    backend.store(clock)
    assert backend.leftovers() == kept_names
    assert backend.store(clock).read(kept) == b"abc"


def test_disk_removes_a_crashed_safety_check_copy(tmp_path, clock: FakeClock) -> None:
    backend = DiskBackend(tmp_path)
    backend.plant("tmpa1b2c3.check", b"decompressed copy of a result being checked")
    backend.store(clock)
    assert backend.leftovers() == []


def test_discard_forgets_the_result(backend, clock: FakeClock) -> None:
    store = backend.store(clock)
    ref = store.put("job1", [b"abc"])
    store.discard("job1")
    store.discard("never-there")
    with pytest.raises(NotFound):
        store.open("job1", ref.token)
    assert backend.leftovers() == []


def test_s3_spares_young_leftovers_other_replicas_may_still_write(s3_client, tmp_path) -> None:
    # Uploads are spared the same way, by their start time; moto reports a fixed one (2010).
    backend = S3Backend(s3_client, tmp_path)
    clock = FakeClock(start=time.time())
    backend.plant("job1.result", b"completed a moment ago, its record not yet written")
    store = backend.store(clock, grace_s=600)
    assert backend.leftovers() == ["job1.result"]
    clock.advance(601)
    assert store.sweep() == 0  # no result expired; the orphan went
    assert backend.leftovers() == []


@pytest.mark.parametrize("sync", [True, False])
def test_disk_result_survives_sigkill_of_the_writer(tmp_path, clock: FakeClock, sync) -> None:
    """A real crash: a process commits one result, is SIGKILLed mid-way through the next
    (with fsyncs, and without: the order of writes alone must hold against a process crash)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from broker.results import DiskResultStore
        from edif.clock import FakeClock
        store = DiskResultStore(
            Path({str(tmp_path / "results")!r}), FakeClock(), 3600, 10**7, sync={sync}
        )
        ref = store.put("done", [b"committed bytes"])
        print(ref.token, flush=True)
        writer = store.begin("midway")
        writer.write(b"x" * 100000)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    token = proc.stdout.strip()
    backend = DiskBackend(tmp_path, sync=sync)
    assert any(name.endswith(".part") for name in backend.leftovers())
    restarted = backend.store(clock, max_bytes=10**7)
    assert b"".join(restarted.open("done", token).chunks()) == b"committed bytes"
    assert backend.leftovers() == ["done.meta.json", "done.result"]
