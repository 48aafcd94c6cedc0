"""Verification of a whole audit log, as a pure function of its stored rows and checkpoint.

Flow of `verify_log`: (1) each entry on its own: its body parses, names its own seq (a row
moved to another seq = reordered), hashes to the stored hash (edited), and its stored
pseudonym matches the body's commitment, or was redacted by a recorded erasure; (2) the links:
each entry's `prev` is the previous entry's hash, and where seqs jump, the gap is exactly
covered by the spans that compaction entries recorded (so removing or inserting an entry
anywhere breaks a link); (3) each compaction entry's accounting digest matches its accounting
rows; (4) the log ends exactly at the signed checkpoint (the tail cannot be cut, nor extended or
rewritten without the broker's key). The report names the first bad seq and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import checkpoint as cp
from broker.audit.model import (
    GENESIS,
    AuditAction,
    Problem,
    VerifyReport,
    accounting_digest,
    commitment,
    entry_hash,
)

MAX_PROBLEMS = 50


@dataclass(frozen=True)
class StoredEntry:
    seq: int
    hash: str
    body: str
    pseudonym: str | None
    salt: str | None


@dataclass(frozen=True)
class StoredAccounting:
    cseq: int
    body: str
    pseudonym: str | None
    salt: str | None


def verify_log(
    entries: list[StoredEntry],
    accounting: list[StoredAccounting],
    checkpoint: cp.Checkpoint | None,
    public_keys: dict[str, Ed25519PublicKey],
) -> VerifyReport:
    entries = sorted(entries, key=lambda e: e.seq)
    problems: list[Problem] = []
    bodies: dict[int, dict[str, Any]] = {}
    for entry in entries:
        body = _own_problem(entry, problems)
        if body is not None:
            bodies[entry.seq] = body
    erased_entries, erased_accounting = _erasures(bodies)
    spans = _spans(bodies)
    _check_links(entries, bodies, spans, problems)
    _check_redactions(entries, bodies, erased_entries, problems)
    _check_accounting(bodies, accounting, erased_accounting, problems)
    head = entries[-1] if entries else None
    _check_checkpoint(head, {e.seq: e for e in entries}, checkpoint, public_keys, problems)
    problems.sort(key=lambda p: p.seq)
    first = problems[0] if problems else None
    return VerifyReport(
        ok=not problems,
        entries=len(entries),
        head_seq=head.seq if head else 0,
        checkpoint_seq=checkpoint.seq if checkpoint else None,
        first_bad_seq=first.seq if first else None,
        reason=first.reason if first else None,
        problems=problems[:MAX_PROBLEMS],
    )


def _own_problem(entry: StoredEntry, problems: list[Problem]) -> dict[str, Any] | None:
    """The entry's body if it is intact on its own; else records why not and returns None."""
    try:
        body = json.loads(entry.body)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError:
        problems.append(Problem(seq=entry.seq, reason="its record is not valid JSON (edited)"))
        return None
    if body.get("seq") != entry.seq:
        reason = f"it holds the record of entry {body.get('seq')} (entries reordered or moved)"
        problems.append(Problem(seq=entry.seq, reason=reason))
        return None
    if entry_hash(body) != entry.hash:
        problems.append(
            Problem(seq=entry.seq, reason="its contents do not match its hash (entry edited)")
        )
        return None
    subject = body.get("subject")
    linked = entry.pseudonym is not None or entry.salt is not None
    if linked and not _committed(entry.pseudonym, entry.salt, subject):
        reason = "its pseudonym does not match its commitment (edited)"
        problems.append(Problem(seq=entry.seq, reason=reason))
        return None
    return body


def _committed(pseudonym: str | None, salt: str | None, subject: Any) -> bool:
    """Whether the stored pseudonym and salt open the body's commitment."""
    if not (pseudonym and salt and isinstance(subject, str)):
        return False
    try:
        return commitment(pseudonym, salt) == subject
    except ValueError:  # a salt that is not hex
        return False


def _erasures(bodies: dict[int, dict[str, Any]]) -> tuple[set[int], set[tuple[int, int]]]:
    entries: set[int] = set()
    accounting: set[tuple[int, int]] = set()
    for body in bodies.values():
        if body.get("action") == AuditAction.ERASURE:
            data = body.get("data", {})
            entries.update(data.get("entries", []))
            accounting.update((c, i) for c, i in data.get("accounting", []))
    return entries, accounting


def _spans(bodies: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Every span of removed entries that a compaction recorded, by its first seq."""
    spans: dict[int, dict[str, Any]] = {}
    for body in bodies.values():
        if body.get("action") == AuditAction.COMPACTION:
            for span in body.get("data", {}).get("spans", []):
                spans[span["first"]] = span
    return spans


def _check_links(
    entries: list[StoredEntry],
    bodies: dict[int, dict[str, Any]],
    spans: dict[int, dict[str, Any]],
    problems: list[Problem],
) -> None:
    prev_seq, prev_hash = 0, GENESIS
    for entry in entries:
        body = bodies.get(entry.seq)
        claimed_prev = body.get("prev") if body else None
        if body is not None:
            if entry.seq == prev_seq + 1:
                if claimed_prev != prev_hash:
                    reason = f"it does not follow entry {prev_seq} (an entry inserted or replaced)"
                    problems.append(Problem(seq=entry.seq, reason=reason))
            elif not _gap_covered(prev_seq, prev_hash, entry.seq, claimed_prev, spans):
                missing = (
                    f"{prev_seq + 1}"
                    if entry.seq == prev_seq + 2
                    else (f"{prev_seq + 1}..{entry.seq - 1}")
                )
                reason = f"entry {missing} missing (removed, and no compaction accounts for it)"
                problems.append(Problem(seq=prev_seq + 1, reason=reason))
        prev_seq, prev_hash = entry.seq, entry.hash


def _gap_covered(
    prev_seq: int, prev_hash: str, seq: int, claimed_prev: Any, spans: dict[int, dict[str, Any]]
) -> bool:
    """Whether recorded spans chain from (prev_seq, prev_hash) to just before `seq`."""
    at, link = prev_seq + 1, prev_hash
    while at < seq:
        span = spans.get(at)
        if span is None or span.get("prev") != link or span.get("last", at - 1) < at:
            return False
        at, link = span["last"] + 1, span.get("last_hash")
    return at == seq and link == claimed_prev


def _check_redactions(
    entries: list[StoredEntry],
    bodies: dict[int, dict[str, Any]],
    erased: set[int],
    problems: list[Problem],
) -> None:
    for entry in entries:
        body = bodies.get(entry.seq)
        if body and body.get("subject") and entry.pseudonym is None and entry.seq not in erased:
            reason = "its pseudonym was removed without a recorded erasure"
            problems.append(Problem(seq=entry.seq, reason=reason))


def _check_accounting(
    bodies: dict[int, dict[str, Any]],
    accounting: list[StoredAccounting],
    erased: set[tuple[int, int]],
    problems: list[Problem],
) -> None:
    by_compaction: dict[int, list[dict[str, Any]]] = {}
    for row in accounting:
        try:
            body = json.loads(row.body)
        except ValueError:
            body = {"idx": -1, "broken": True}
        if not isinstance(body, dict):
            body = {"idx": -1, "broken": True}
        by_compaction.setdefault(row.cseq, []).append(body)
        key = (row.cseq, body.get("idx"))
        subject = body.get("subject")
        if body.get("cseq") != row.cseq:
            problems.append(Problem(seq=row.cseq, reason="an accounting row was moved (edited)"))
        elif row.pseudonym is None and row.salt is None:
            if subject and key not in erased:
                reason = "an accounting row's pseudonym was removed without a recorded erasure"
                problems.append(Problem(seq=row.cseq, reason=reason))
        elif not _committed(row.pseudonym, row.salt, subject):
            reason = "an accounting row's pseudonym does not match its commitment (edited)"
            problems.append(Problem(seq=row.cseq, reason=reason))
    compactions = {
        seq: body for seq, body in bodies.items() if body.get("action") == AuditAction.COMPACTION
    }
    for seq in sorted(set(compactions) | set(by_compaction)):
        body = compactions.get(seq)
        rows = by_compaction.get(seq, [])
        if body is None:
            if seq not in bodies:  # else the entry itself was already reported
                reason = "accounting rows name no compaction entry (inserted)"
                problems.append(Problem(seq=seq, reason=reason))
            continue
        data = body.get("data", {})
        if len(rows) != data.get("rows") or accounting_digest(rows) != data.get("accounting"):
            reason = "its accounting rows were changed, removed or added"
            problems.append(Problem(seq=seq, reason=reason))


def _check_checkpoint(
    head: StoredEntry | None,
    by_seq: dict[int, StoredEntry],
    checkpoint: cp.Checkpoint | None,
    public_keys: dict[str, Ed25519PublicKey],
    problems: list[Problem],
) -> None:
    if checkpoint is None:
        if head is not None:
            reason = "the log has no signed checkpoint (head.json removed)"
            problems.append(Problem(seq=head.seq, reason=reason))
        return
    if not cp.signature_ok(checkpoint, public_keys):
        reason = "the head checkpoint's signature does not verify (head.json forged or edited)"
        problems.append(Problem(seq=max(checkpoint.seq, 0), reason=reason))
        return
    head_seq = head.seq if head else 0
    if head_seq < checkpoint.seq:
        reason = (
            f"entries {head_seq + 1}..{checkpoint.seq} are missing: the log ends before its "
            "signed checkpoint (tail removed)"
        )
        problems.append(Problem(seq=head_seq + 1, reason=reason))
    elif head_seq > checkpoint.seq:
        reason = (
            f"entries after the signed checkpoint (seq {checkpoint.seq}) carry no signature "
            "(appended outside the broker)"
        )
        problems.append(Problem(seq=checkpoint.seq + 1, reason=reason))
    elif head is not None and by_seq[head_seq].hash != checkpoint.hash:
        reason = "the head does not match the signed checkpoint (the log was rewritten)"
        problems.append(Problem(seq=head_seq, reason=reason))
    elif head is not None and _entry_ts(by_seq[head_seq]) > checkpoint.ts:
        # Signed "before" the entry it covers: only a key that is retired by now could have
        # been used to back-date it (the verifying key is the one live at checkpoint.ts).
        reason = "the signed checkpoint is dated before the entry it covers (back-dated)"
        problems.append(Problem(seq=head_seq, reason=reason))


def _entry_ts(entry: StoredEntry) -> float:
    try:
        return float(json.loads(entry.body).get("ts", 0.0))
    except (ValueError, TypeError, AttributeError):
        return 0.0
