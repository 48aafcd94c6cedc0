"""The audit log's records, and the pure functions that hash and commit them.

An `AuditEvent` is what a caller reports (it may carry the raw user id, which the log turns into
a pseudonym and never stores). An entry's *body* is the canonical JSON document the chain
hashes: `entry_hash(body)` is SHA-256 over `canonical(body)`, and the body holds the previous
entry's hash, so changing, removing, inserting or reordering anything breaks the chain. The
pseudonym itself sits *outside* the body; the body holds only `subject`, a salted commitment
to it (`commitment(pseudonym, salt)`), so erasure can drop pseudonym and salt without touching
what the chain hashed. `AuditEntry` and `AccountingRow` are the read views; `VerifyReport` is
what `verify()` answers.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

GENESIS = "0" * 64  # the `prev` of entry 1
BODY_VERSION = 1


class AuditAction(StrEnum):
    JOB_SUBMIT = "job.submit"
    JOB_REFUSED = "job.refused"
    JOB_COMPLETE = "job.complete"
    JOB_ERROR = "job.error"
    QUOTA_CHANGE = "quota.change"
    TOKEN_ISSUE = "token.issue"
    COMPACTION = "audit.compaction"  # detailed entries replaced by accounting rows
    ERASURE = "audit.erasure"  # a data subject's pseudonyms unlinked from their entries

    @property
    def detailed(self) -> bool:
        """Entries that expire into accounting rows after the retention period."""
        return self.value.startswith("job.")


class AuditEvent(BaseModel):
    """Something that happened, as a caller reports it. Never request contents or tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: AuditAction
    # The raw user id: pseudonymized by the log on append, never stored, printed or dumped.
    user: str | None = Field(default=None, repr=False, exclude=True)
    role: str | None = None
    model: str | None = None  # repo id
    site: str | None = None
    job_id: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    gpu_s: float = 0.0
    outcome: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)  # system entries (compaction, erasure)


class AuditEntry(BaseModel):
    """One stored entry, as read back (the pseudonym is None when erased or never set)."""

    model_config = ConfigDict(frozen=True)

    seq: int
    hash: str
    prev: str
    ts: float
    action: str
    kid: str | None
    pseudonym: str | None
    erased: bool
    role: str | None
    model: str | None
    site: str | None
    job_id: str | None
    bytes_in: int
    bytes_out: int
    gpu_s: float
    outcome: str | None
    data: dict[str, Any]


class AccountingRow(BaseModel):
    """Aggregated accounting for one (day, key id, pseudonym, role, model, site)."""

    model_config = ConfigDict(frozen=True)

    compaction_seq: int
    idx: int
    day: str
    kid: str | None
    pseudonym: str | None
    erased: bool
    role: str | None
    model: str | None
    site: str | None
    submitted: int
    completed: int
    failed: int
    refused: int
    gpu_s: float
    bytes_in: int
    bytes_out: int


class AuditFilter(BaseModel):
    model_config = ConfigDict(frozen=True)

    since: float | None = None  # ts >= since
    until: float | None = None  # ts < until
    actions: frozenset[str] | None = None
    pseudonyms: frozenset[str] | None = None


class Problem(BaseModel):
    seq: int
    reason: str


class VerifyReport(BaseModel):
    """The verdict on a whole log; `first_bad_seq`/`reason` name the earliest problem."""

    ok: bool
    entries: int
    head_seq: int
    checkpoint_seq: int | None
    first_bad_seq: int | None = None
    reason: str | None = None
    problems: list[Problem] = Field(default_factory=list)

    def summary(self) -> str:
        if self.ok:
            return (
                f"audit log OK: {self.entries} entries, head seq {self.head_seq}, "
                f"signed checkpoint at seq {self.checkpoint_seq}"
            )
        more = f" ({len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
        return f"audit log TAMPERED: entry {self.first_bad_seq}: {self.reason}{more}"


def canonical(document: dict[str, Any]) -> bytes:
    """The one byte encoding that is hashed and signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def commitment(pseudonym: str, salt: str) -> str:
    """A hiding commitment to a pseudonym: without the (random, erasable) salt it links nothing."""
    return hashlib.sha256(bytes.fromhex(salt) + b"\x00" + pseudonym.encode("utf-8")).hexdigest()


def accounting_digest(bodies: list[dict[str, Any]]) -> str:
    """What a compaction entry records of the accounting rows it wrote (in idx order)."""
    digest = hashlib.sha256()
    for body in sorted(bodies, key=lambda b: b["idx"]):
        digest.update(canonical(body) + b"\n")
    return digest.hexdigest()


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def entry_from_row(seq: int, hash_: str, body: dict[str, Any], pseudonym: str | None) -> AuditEntry:
    return AuditEntry(
        seq=seq,
        hash=hash_,
        prev=body.get("prev", ""),
        ts=body.get("ts", 0.0),
        action=body.get("action", ""),
        kid=body.get("kid"),
        pseudonym=pseudonym,
        erased=pseudonym is None and body.get("subject") is not None,
        role=body.get("role"),
        model=body.get("model"),
        site=body.get("site"),
        job_id=body.get("job"),
        bytes_in=body.get("bytes_in", 0),
        bytes_out=body.get("bytes_out", 0),
        gpu_s=body.get("gpu_s", 0.0),
        outcome=body.get("outcome"),
        data=body.get("data", {}),
    )


def accounting_from_row(body: dict[str, Any], pseudonym: str | None) -> AccountingRow:
    return AccountingRow(
        compaction_seq=body["cseq"],
        idx=body["idx"],
        day=body["day"],
        kid=body.get("kid"),
        pseudonym=pseudonym,
        erased=pseudonym is None and body.get("subject") is not None,
        role=body.get("role"),
        model=body.get("model"),
        site=body.get("site"),
        submitted=body["submitted"],
        completed=body["completed"],
        failed=body["failed"],
        refused=body["refused"],
        gpu_s=body["gpu_s"],
        bytes_in=body["bytes_in"],
        bytes_out=body["bytes_out"],
    )
