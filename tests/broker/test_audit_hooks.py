"""The broker's audit hooks: one entry when a job is received, refused and ended; no raw ids."""

from __future__ import annotations

import json
import logging
import time

import pytest
from broker_fakes import GPT2_KEY, SITES, FakeIdentity, error, settings_for

from broker.audit import JobAuditor, open_audit_log
from broker.catalog import SiteCatalog
from broker.results import DiskResultStore
from broker.service import BrokerService
from edif.errors import PermissionDenied
from proto import site_agent_pb2 as pb

ALICE = FakeIdentity("alice@example.org")
PAYLOAD = b"x" * 123


@pytest.fixture
async def audited(tmp_path, sites, clock):
    settings = settings_for(tmp_path)
    audit = open_audit_log(settings.data_dir, settings.keys_dir, None, clock)
    catalog = SiteCatalog(SITES, sites, settings.describe_refresh_s, settings.startup_wait_s)
    results = DiskResultStore(
        settings.data_dir / "results", clock, settings.result_ttl_s, settings.max_result_bytes
    )
    service = BrokerService(
        settings, catalog, sites, results, lambda sub: "u-pseudo", clock, audit=JobAuditor(audit)
    )
    await service.start()
    yield service, audit
    await service.close()
    audit.close()


async def submit(service, identity=ALICE, key=GPT2_KEY):
    envelope = json.dumps({"model_key": key, "session_id": "", "compress": False})
    return await service.submit(
        identity, envelope, PAYLOAD, {"nnsight-version": "0.8.1"}, "http://b/"
    )


async def test_a_completed_job_is_audited_at_submission_and_end(audited) -> None:
    service, audit = audited
    reply = await submit(service)
    await service.drain()
    submitted, completed = audit.entries()
    assert (submitted.action, completed.action) == ("job.submit", "job.complete")
    assert submitted.job_id == completed.job_id == reply.id
    assert submitted.model == "openai-community/gpt2" and submitted.role == "researcher"
    assert completed.site == "site-a" and completed.bytes_in == len(PAYLOAD)
    job = service.job(reply.id)
    assert completed.bytes_out == job.meta["result_bytes"] > 0
    assert completed.gpu_s == job.meta["execution_s"]
    assert submitted.pseudonym == completed.pseudonym != "u-pseudo"  # not the logs' pseudonym
    assert audit.verify().ok


async def test_a_failed_job_is_audited_as_error(audited, sites) -> None:
    service, audit = audited
    sites.script("site-a", [error(pb.USER, "Traceback: secret prompt text")])
    await submit(service)
    await service.drain()
    ended = audit.entries()[-1]
    assert ended.action == "job.error" and ended.outcome == "error"
    assert "secret prompt" not in audit.db_path.read_bytes().decode("latin-1")


async def test_a_refused_job_is_audited(audited) -> None:
    service, audit = audited
    with pytest.raises(PermissionDenied):
        await submit(service, FakeIdentity("eve@example.org", role="site"))
    (refused,) = audit.entries()
    assert refused.action == "job.refused" and refused.outcome.startswith("PermissionDenied")
    assert refused.bytes_in == len(PAYLOAD)


async def test_neither_raw_ids_nor_tokens_reach_the_store_or_logs(audited, caplog) -> None:
    service, audit = audited
    caplog.set_level(logging.DEBUG)
    await submit(service)
    await service.drain()
    with pytest.raises(PermissionDenied):
        await submit(service, FakeIdentity("eve@example.org", role="site"))
    assert audit.verify().ok
    stored = b"".join(p.read_bytes() for p in audit.directory.iterdir() if p.is_file())
    for secret in (b"alice@example.org", b"eve@example.org", b"alice-token"):
        assert secret not in stored
        assert secret.decode() not in caplog.text


async def test_an_audit_failure_does_not_fail_the_job(audited, caplog) -> None:
    service, audit = audited
    audit.close()  # every write now fails
    reply = await submit(service)
    await service.drain()
    assert service.job(reply.id).state == "COMPLETED"
    assert "audit: could not record" in caplog.text


class RecordingLog:
    """An AuditLog that keeps each batch it is given (as the events' sizes); fails the first
    `fail` batches."""

    def __init__(self, fail: int = 0) -> None:
        self.batches: list[list[int]] = []
        self.failures = 0
        self._fail = fail

    def append_many(self, events):
        if self._fail:
            self._fail -= 1
            self.failures += 1
            raise OSError("disk full")
        self.batches.append([event.bytes_in for event in events])
        return []


def _refuse(auditor: JobAuditor, size: int) -> None:
    auditor.refused(ALICE, size, PermissionDenied("no"))


def test_the_writer_thread_writes_what_arrives_within_its_window_as_one_batch() -> None:
    recorded = RecordingLog()
    auditor = JobAuditor(recorded, background=True, window_s=30.0)
    for size in (1, 2, 3):
        _refuse(auditor, size)
    auditor.close()  # does not wait out the window: it writes what is queued, in order
    assert recorded.batches == [[1, 2, 3]]
    auditor.close()  # idempotent


def test_a_failed_batch_is_logged_and_the_next_one_is_written(caplog) -> None:
    recorded = RecordingLog(fail=1)
    auditor = JobAuditor(recorded, background=True, window_s=0.0)
    with caplog.at_level(logging.ERROR, logger="broker.audit.hooks"):
        _refuse(auditor, 1)
        for _ in range(100):  # the first batch goes alone (no window), and fails
            if recorded.failures:
                break
            time.sleep(0.02)
        _refuse(auditor, 2)
        auditor.close()
    assert recorded.failures == 1 and "could not record job.refused" in caplog.text
    assert recorded.batches == [[2]]
