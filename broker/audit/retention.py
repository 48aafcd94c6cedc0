"""Retention: detailed job entries past their period become aggregated accounting rows.

Design (chain stays verifiable): `plan_compaction` picks the detailed (`job.*`) entries older
than the cutoff (a UTC midnight, so each day is compacted whole), sums them per (day, key id,
pseudonym, role, model, site) into accounting rows, and describes what is removed as *spans*:
maximal runs of consecutive removed seqs, each with the `prev` of its first entry and the hash
of its last. The store then deletes those entries and appends one `audit.compaction` entry,
itself chained, whose body holds the spans, the cutoff and a digest of the accounting rows.
`verify` accepts a jump in seqs only where recorded spans chain exactly across it (`last_hash`
commits to the whole removed range through the hash chain), and recomputes the digest. Other
entries (compaction, erasure, quota changes) are kept for good.

Accounting rows keep the pseudonym the same way entries do: outside the hashed body, with a
fresh salted commitment inside it, so erasure works on them too.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from broker.audit.model import AuditAction, commitment, day_of

DAY_S = 86400.0


def cutoff_for(now: float, retention_s: float) -> float:
    """Entries with ts before this expire: the UTC midnight at or before now - retention."""
    return (now - retention_s) // DAY_S * DAY_S


@dataclass(frozen=True)
class Candidate:
    seq: int
    hash: str
    body: dict[str, Any]
    pseudonym: str | None


@dataclass(frozen=True)
class NewAccounting:
    body: dict[str, Any]  # hashed; `cseq` and `idx` set
    pseudonym: str | None
    salt: str | None


@dataclass
class CompactionPlan:
    removed: list[int] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)
    rows: list[NewAccounting] = field(default_factory=list)


def plan_compaction(rows: list[Candidate], cutoff: float, cseq: int) -> CompactionPlan:
    """What compaction entry `cseq` will remove and write, for entries sorted by seq."""
    plan = CompactionPlan()
    sums: dict[tuple[Any, ...], dict[str, Any]] = {}
    span: dict[str, Any] | None = None
    last_seq = None
    # A submission is accounted to the site its job ended on, so one job is one row.
    sites = {r.body.get("job"): r.body.get("site") for r in rows if r.body.get("site")}
    for row in rows:
        body = row.body
        expired = _detailed(body.get("action")) and body.get("ts", cutoff) < cutoff
        if not expired:
            span = None
            last_seq = row.seq
            continue
        plan.removed.append(row.seq)
        if span is not None and last_seq == row.seq - 1:
            span["last"], span["last_hash"] = row.seq, row.hash
        else:
            span = {"first": row.seq, "last": row.seq, "prev": body["prev"], "last_hash": row.hash}
            plan.spans.append(span)
        last_seq = row.seq
        _add(sums, body, row.pseudonym, body.get("site") or sites.get(body.get("job")))
    for idx, (key, totals) in enumerate(sorted(sums.items(), key=lambda kv: _order(kv[0]))):
        plan.rows.append(_accounting(cseq, idx, key, totals))
    return plan


def _detailed(action: Any) -> bool:
    try:
        return AuditAction(action).detailed
    except ValueError:
        return False


def _add(
    sums: dict[tuple[Any, ...], dict[str, Any]],
    body: dict[str, Any],
    pseudonym: str | None,
    site: str | None,
) -> None:
    key = (
        day_of(body["ts"]),
        body.get("kid"),
        pseudonym,
        body.get("role"),
        body.get("model"),
        site,
    )
    totals = sums.setdefault(
        key,
        {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "refused": 0,
            "gpu_s": 0.0,
            "bytes_in": 0,
            "bytes_out": 0,
        },
    )
    action = body.get("action")
    if action == AuditAction.JOB_SUBMIT:
        totals["submitted"] += 1
        totals["bytes_in"] += body.get("bytes_in", 0)  # counted once per job, at submission
    elif action == AuditAction.JOB_REFUSED:
        totals["refused"] += 1
    else:
        totals["completed" if action == AuditAction.JOB_COMPLETE else "failed"] += 1
        totals["bytes_out"] += body.get("bytes_out", 0)
        totals["gpu_s"] = round(totals["gpu_s"] + body.get("gpu_s", 0.0), 6)


def _order(key: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple("" if part is None else str(part) for part in key)


def _accounting(cseq: int, idx: int, key: tuple[Any, ...], totals: dict[str, Any]) -> NewAccounting:
    day, kid, pseudonym, role, model, site = key
    salt = secrets.token_hex(16) if pseudonym else None
    body = {
        "cseq": cseq,
        "idx": idx,
        "day": day,
        "kid": kid,
        "subject": commitment(pseudonym, salt) if pseudonym and salt else None,
        "role": role,
        "model": model,
        "site": site,
        **totals,
    }
    return NewAccounting(body=body, pseudonym=pseudonym, salt=salt)
