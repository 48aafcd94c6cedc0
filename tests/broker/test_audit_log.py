"""The audit log: chain, signed head, tamper detection, retention, export and erasure."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pytest

from auth.keys import KeyStore
from broker.audit import (
    AuditAction,
    AuditEvent,
    AuditFilter,
    AuditKeyring,
    checkpoint,
    open_audit_log,
)
from broker.audit.export import to_csv
from broker.audit.keys import audit_pseudonym
from edif.clock import FakeClock

DAY = 86400.0
ALICE = "alice@uni-example.eu"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def log(tmp_path, clock):
    audit = open_audit_log(tmp_path / "broker", tmp_path / "keys", None, clock)
    yield audit
    audit.close()


def job_events(log, clock, user=ALICE, n=3):
    for i in range(n):
        log.append(
            AuditEvent(
                action=AuditAction.JOB_SUBMIT, user=user, role="researcher",
                model="openai-community/gpt2", job_id=f"job-{user[:3]}-{i}", bytes_in=100,
            )
        )  # fmt: skip
        clock.advance(1)
        log.append(
            AuditEvent(
                action=AuditAction.JOB_COMPLETE, user=user, role="researcher",
                model="openai-community/gpt2", site="ansbach", job_id=f"job-{user[:3]}-{i}",
                bytes_in=100, bytes_out=2000, gpu_s=1.5, outcome="completed",
            )
        )  # fmt: skip
        clock.advance(1)


def sql(log, statement, *args):
    db = sqlite3.connect(log.db_path)
    with db:
        db.execute(statement, args)
    db.close()


def test_appended_entries_chain_and_verify(log, clock) -> None:
    job_events(log, clock)
    entries = log.entries()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0].prev == "0" * 64
    assert all(b.prev == a.hash for a, b in zip(entries, entries[1:], strict=False))
    assert entries[1].site == "ansbach" and entries[1].gpu_s == 1.5
    assert entries[0].pseudonym.startswith("a-") and entries[0].kid
    report = log.verify()
    assert report.ok, report
    assert report.head_seq == report.checkpoint_seq == 6


def test_a_batch_chains_like_single_appends_and_is_signed_once(log, clock) -> None:
    """`append_many` (the broker's group commit): the same chain as one append per entry, and
    one signed head for the batch, naming its last entry."""
    job_events(log, clock, n=1)
    events = [
        AuditEvent(action=AuditAction.JOB_SUBMIT, user=ALICE, role="researcher", job_id=f"b{i}")
        for i in range(3)
    ]
    signed_before = checkpoint.read(log.head_path)
    batch = log.append_many(events)
    assert [e.seq for e in batch] == [3, 4, 5] and [e.job_id for e in batch] == ["b0", "b1", "b2"]
    entries = log.entries()
    assert all(b.prev == a.hash for a, b in zip(entries, entries[1:], strict=False))
    head = checkpoint.read(log.head_path)
    assert signed_before.seq == 2 and (head.seq, head.hash) == (5, batch[-1].hash)
    assert log.verify().ok
    assert log.append_many([]) == [] and checkpoint.read(log.head_path) == head


def test_verify_still_passes_after_the_signing_key_is_rotated_out(log, clock, tmp_path) -> None:
    """The head was signed by a key that has since been rotated out and retired: it still
    attests the moment it signed, and nothing new had to be written for verify to pass."""
    job_events(log, clock)
    keys = KeyStore(tmp_path / "keys", clock)
    old_kid = keys.signing_key()[0]
    keys.rotate(grace_s=60)
    clock.advance(3600)
    assert old_kid not in keys.public_keys()  # retired: no token it signed verifies now
    assert log.verify().ok


def test_a_back_dated_checkpoint_is_refused(log, clock, tmp_path) -> None:
    """A checkpoint dated before the entry it covers is the signature of a retired key."""
    job_events(log, clock)
    head = json.loads(log.head_path.read_text())
    keys = KeyStore(tmp_path / "keys", clock)
    kid, key = keys.signing_key()
    forged = checkpoint.sign(head["seq"], head["hash"], head["ts"] - 0.5, kid, key)
    log.head_path.write_text(forged.model_dump_json())
    report = log.verify()
    assert not report.ok and "back-dated" in str(report)


def test_empty_log_verifies(log) -> None:
    assert log.verify().ok


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("hash", "f" * 64),
        ("body", "not json"),
        ("pseudonym", "a-0000"),
        ("salt", "00" * 16),
    ],
)
def test_editing_a_column_is_detected(log, clock, column, value) -> None:
    job_events(log, clock)
    sql(log, f"UPDATE entries SET {column} = ? WHERE seq = 3", value)
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 3, report


@pytest.mark.parametrize(
    "field", ["ts", "action", "kid", "subject", "role", "model", "site", "job", "bytes_in",
              "bytes_out", "gpu_s", "outcome", "prev", "v"],
)  # fmt: skip
def test_editing_any_body_field_is_detected(log, clock, field) -> None:
    job_events(log, clock)
    body = json.loads(log.entries()[3].model_dump_json())  # seq 4
    stored = sqlite3.connect(log.db_path).execute("SELECT body FROM entries WHERE seq=4").fetchone()
    doc = json.loads(stored[0])
    doc[field] = "x" if not isinstance(doc.get(field), int | float) else doc[field] + 1
    sql(log, "UPDATE entries SET body = ? WHERE seq = 4", json.dumps(doc))
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 4, (body, report)
    assert "edited" in report.reason


def test_rewriting_the_whole_chain_is_caught_by_the_signed_head(log, clock, tmp_path) -> None:
    job_events(log, clock)
    from broker.audit.model import canonical, entry_hash

    db = sqlite3.connect(log.db_path)
    prev = "0" * 64
    rows = db.execute("SELECT seq, body FROM entries ORDER BY seq").fetchall()
    with db:
        for seq, text in rows:
            doc = json.loads(text)
            doc["prev"] = prev
            if seq == 2:
                doc["gpu_s"] = 0.0  # hide the GPU time, then re-hash everything after
            prev = entry_hash(doc)
            db.execute(
                "UPDATE entries SET body = ?, hash = ? WHERE seq = ?",
                (canonical(doc).decode(), prev, seq),
            )
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 6 and "rewritten" in report.reason


def test_removing_a_middle_entry_is_detected(log, clock) -> None:
    job_events(log, clock)
    sql(log, "DELETE FROM entries WHERE seq = 3")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 3 and "missing" in report.reason


def test_removing_the_last_entry_is_detected(log, clock) -> None:
    job_events(log, clock)
    sql(log, "DELETE FROM entries WHERE seq = 6")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 6 and "tail removed" in report.reason


def test_removing_the_head_file_is_detected(log, clock) -> None:
    job_events(log, clock)
    log.head_path.unlink()
    assert not log.verify().ok


def test_forged_head_file_is_detected(log, clock) -> None:
    job_events(log, clock)
    head = json.loads(log.head_path.read_text())
    sql(log, "DELETE FROM entries WHERE seq = 6")
    head["seq"] = 5
    log.head_path.write_text(json.dumps(head))
    report = log.verify()
    assert not report.ok and "signature" in report.reason


def test_reordering_entries_is_detected(log, clock) -> None:
    job_events(log, clock)
    db = sqlite3.connect(log.db_path)
    with db:
        db.execute("UPDATE entries SET seq = -1 WHERE seq = 3")
        db.execute("UPDATE entries SET seq = 3 WHERE seq = 4")
        db.execute("UPDATE entries SET seq = 4 WHERE seq = -1")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 3 and "reordered" in report.reason


def test_inserted_entries_are_detected(log, clock) -> None:
    job_events(log, clock)
    from broker.audit.model import canonical, entry_hash

    head = log.entries()[-1]
    doc = json.loads(sqlite3.connect(log.db_path).execute(
        "SELECT body FROM entries WHERE seq = 6").fetchone()[0])  # fmt: skip
    doc.update(seq=7, prev=head.hash, gpu_s=99.0)
    sql(log, "INSERT INTO entries (seq, hash, body) VALUES (?, ?, ?)", 7, entry_hash(doc),
        canonical(doc).decode())  # fmt: skip
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 7


def test_retention_compaction_keeps_the_chain_verifiable(log, clock) -> None:
    job_events(log, clock, n=2)
    log.append(AuditEvent(action=AuditAction.QUOTA_CHANGE, role="admin", data={"role": "x"}))
    job_events(log, clock, user="bob@example.org", n=1)
    clock.advance(10 * DAY)
    job_events(log, clock, n=1)  # recent: kept in detail
    entry = log.compact(retention_s=5 * DAY)
    assert entry is not None and entry.action == AuditAction.COMPACTION
    assert entry.data["removed"] == 6
    actions = [e.action for e in log.entries()]
    assert actions == ["quota.change", "job.submit", "job.complete", "audit.compaction"]
    rows = log.accounting()
    alice = [r for r in rows if r.submitted == 2]
    assert len(rows) == 2 and alice[0].gpu_s == 3.0 and alice[0].bytes_out == 4000
    assert log.verify().ok, log.verify()
    # a second compaction across the first one's gap, then more entries: still whole
    clock.advance(10 * DAY)
    assert log.compact(retention_s=5 * DAY) is not None
    job_events(log, clock, n=1)
    assert log.verify().ok, log.verify()
    assert log.compact(retention_s=5 * DAY) is None


def test_tampering_with_accounting_rows_is_detected(log, clock) -> None:
    job_events(log, clock, n=2)
    clock.advance(10 * DAY)
    entry = log.compact(retention_s=5 * DAY)
    db = sqlite3.connect(log.db_path)
    body = json.loads(db.execute("SELECT body FROM accounting").fetchone()[0])
    body["gpu_s"] = 0.0
    sql(log, "UPDATE accounting SET body = ?", json.dumps(body))
    report = log.verify()
    assert not report.ok and report.first_bad_seq == entry.seq


def test_export_finds_a_subject_under_every_key(log, clock, tmp_path) -> None:
    job_events(log, clock, n=1)
    AuditKeyring(tmp_path / "keys", clock=clock).rotate()
    clock.advance(5)
    job_events(log, clock, n=1)
    job_events(log, clock, user="bob@example.org", n=1)
    found = log.export_subject(ALICE)
    assert len(found.pseudonyms) == 2
    assert len(found.entries) == 4
    assert len({e.kid for e in found.entries}) == 2
    assert ALICE not in found.model_dump_json()
    assert "record" in to_csv(found.entries, found.accounting).splitlines()[0]


def test_erasure_unlinks_the_subject_and_keeps_verify_green(log, clock) -> None:
    job_events(log, clock, n=2)
    clock.advance(10 * DAY)
    log.compact(retention_s=5 * DAY)
    job_events(log, clock, n=1)
    job_events(log, clock, user="bob@example.org", n=1)
    before = log.export_subject(ALICE)
    assert len(before.entries) == 2 and len(before.accounting) == 1
    report = log.erase(ALICE)
    assert (report.entries, report.accounting) == (2, 1)
    after = log.export_subject(ALICE)
    assert after.entries == [] and after.accounting == []
    assert len(log.export_subject("bob@example.org").entries) == 2
    assert sum(e.erased for e in log.entries()) == 2
    verdict = log.verify()
    assert verdict.ok, verdict
    assert log.entries()[-1].action == AuditAction.ERASURE


def test_redacting_without_an_erasure_entry_is_detected(log, clock) -> None:
    job_events(log, clock)
    sql(log, "UPDATE entries SET pseudonym = NULL, salt = NULL WHERE seq = 2")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 2


def test_audit_keys_are_private_separate_and_rotate(tmp_path, clock) -> None:
    ring = AuditKeyring(tmp_path / "keys", rotation_s=30 * DAY, clock=clock)
    kid, key = ring.active()
    path = tmp_path / "keys" / f"audit-pseudonym-{kid}.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not (tmp_path / "keys" / "pseudonym.key").exists()
    assert ring.active()[0] == kid
    clock.advance(31 * DAY)
    newer, _ = ring.active()
    assert newer > kid and ring.kids() == [kid, newer]
    assert ring.pseudonyms_of(ALICE)[kid] == audit_pseudonym(key, ALICE)


def test_filters(log, clock) -> None:
    start = clock.now()
    job_events(log, clock)
    assert len(log.entries(AuditFilter(since=start + 2))) == 4
    only = log.entries(AuditFilter(actions=frozenset({"job.complete"})))
    assert {e.action for e in only} == {"job.complete"}
