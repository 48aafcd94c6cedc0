"""`AuditLog`, the interface the broker writes through, and its SQLite implementation.

`SqliteAuditLog` keeps `<data_dir>/audit/audit.db` (SQLite, WAL, synchronous=FULL) and the
signed head `<data_dir>/audit/head.json`. Tables: `entries(seq, hash, body, pseudonym, salt)`
where `body` is the canonical JSON the chain hashes, and `accounting(cseq, idx, body,
pseudonym, salt)` for compacted days. Pseudonym and salt live outside the hashed body (see
`broker.audit.model`), so erasure can null them and the chain still verifies.

Flow of `append`: pseudonymize the user under the active audit key (a fresh 16-byte salt per
entry), then, holding a process lock and an flock on `audit/.lock` (the broker and `edif
audit` may write at once), read the head, build and hash the body, insert it, commit, and
re-sign `head.json`. `compact`, `erase` and `verify` take the same lock, so each sees a
consistent database + head pair. `append_many` does the same for a batch: one transaction and
one signature for all of its entries (the broker's hooks write batches, `broker.audit.hooks`).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from auth.keys import KeyStore, ensure_private_dir
from broker.audit import checkpoint as cp
from broker.audit.keys import AuditKeyring
from broker.audit.model import (
    BODY_VERSION,
    GENESIS,
    AccountingRow,
    AuditAction,
    AuditEntry,
    AuditEvent,
    AuditFilter,
    VerifyReport,
    accounting_digest,
    accounting_from_row,
    canonical,
    commitment,
    entry_from_row,
    entry_hash,
)
from broker.audit.retention import Candidate, cutoff_for, plan_compaction
from broker.audit.verify import StoredAccounting, StoredEntry, verify_log
from edif.clock import Clock, SystemClock
from edif.errors import AuditError

DB_FILE = "audit.db"
HEAD_FILE = "head.json"
LOCK_FILE = ".lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    body TEXT NOT NULL,
    pseudonym TEXT,
    salt TEXT
);
CREATE INDEX IF NOT EXISTS entries_pseudonym ON entries(pseudonym);
CREATE TABLE IF NOT EXISTS accounting (
    cseq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    body TEXT NOT NULL,
    pseudonym TEXT,
    salt TEXT,
    PRIMARY KEY (cseq, idx)
);
CREATE INDEX IF NOT EXISTS accounting_pseudonym ON accounting(pseudonym);
"""


class AuditLog(Protocol):
    def append(self, event: AuditEvent) -> AuditEntry | None: ...

    def append_many(self, events: Sequence[AuditEvent]) -> list[AuditEntry]: ...

    def entries(self, filter: AuditFilter | None = None) -> list[AuditEntry]: ...

    def verify(self) -> VerifyReport: ...


class NullAuditLog:
    """Records nothing (unit tests of other parts; a broker with audit switched off)."""

    def append(self, event: AuditEvent) -> AuditEntry | None:
        return None

    def append_many(self, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        return []

    def entries(self, filter: AuditFilter | None = None) -> list[AuditEntry]:
        return []

    def verify(self) -> VerifyReport:
        return VerifyReport(ok=True, entries=0, head_seq=0, checkpoint_seq=None)


class SubjectExport(BaseModel):
    """Everything the log holds on one data subject (GDPR art. 15)."""

    pseudonyms: dict[str, str]  # kid -> pseudonym
    entries: list[AuditEntry]
    accounting: list[AccountingRow]


class ErasureReport(BaseModel):
    entries: int
    accounting: int
    erasure_seq: int | None  # the audit.erasure entry; None when nothing matched


class SqliteAuditLog:
    """The audit log of one broker, in `<directory>/audit.db` + `<directory>/head.json`."""

    def __init__(
        self,
        directory: Path,
        keyring: AuditKeyring,
        signer: KeyStore,
        clock: Clock | None = None,
    ) -> None:
        self.directory = ensure_private_dir(Path(directory))
        self._keyring = keyring
        self._signer = signer
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.directory / DB_FILE, isolation_level=None, check_same_thread=False
        )
        with self._locked():
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    @property
    def db_path(self) -> Path:
        return self.directory / DB_FILE

    @property
    def head_path(self) -> Path:
        return self.directory / HEAD_FILE

    def close(self) -> None:
        self._db.close()

    # -- writing -----------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> AuditEntry:
        return self.append_many([event])[0]

    def append_many(self, events: Sequence[AuditEvent]) -> list[AuditEntry]:
        """Append `events` in order: one transaction and one signed head for all of them (a
        group commit: the fsyncs and the signature are paid once per batch, not per entry)."""
        prepared = [self._fields(event) for event in events]
        if not prepared:
            return []
        with self._locked(), self._transaction():
            head = self._head()
            entries = []
            for fields, pseudonym, salt in prepared:
                entry = self._append_locked(fields, pseudonym, salt, head)
                head = (entry.seq, entry.hash)
                entries.append(entry)
            return entries

    def _fields(self, event: AuditEvent) -> tuple[dict[str, Any], str | None, str | None]:
        """The hashed body's fields of `event`, its pseudonym and salt (kept outside the body)."""
        kid = pseudonym = salt = None
        if event.user is not None:
            kid, pseudonym = self._keyring.pseudonym(event.user)
            salt = secrets.token_hex(16)
        fields = {
            "action": event.action.value,
            "kid": kid,
            "subject": commitment(pseudonym, salt) if pseudonym and salt else None,
            "role": event.role,
            "model": event.model,
            "site": event.site,
            "job": event.job_id,
            "bytes_in": event.bytes_in,
            "bytes_out": event.bytes_out,
            "gpu_s": round(event.gpu_s, 6),
            "outcome": event.outcome,
            "data": event.data,
        }
        return fields, pseudonym, salt

    def compact(self, retention_s: float) -> AuditEntry | None:
        """Replace detailed entries older than the retention by accounting rows (one entry)."""
        cutoff = cutoff_for(self._clock.now(), retention_s)
        with self._locked(), self._transaction():
            head = self._head()  # before the deletion, which may remove the head itself
            cseq = head[0] + 1
            rows = [
                Candidate(seq, hash_, json.loads(body), pseudonym)
                for seq, hash_, body, pseudonym in self._db.execute(
                    "SELECT seq, hash, body, pseudonym FROM entries ORDER BY seq"
                )
            ]
            plan = plan_compaction(rows, cutoff, cseq)
            if not plan.removed:
                return None
            self._db.executemany("DELETE FROM entries WHERE seq = ?", [(s,) for s in plan.removed])
            self._db.executemany(
                "INSERT INTO accounting (cseq, idx, body, pseudonym, salt) VALUES (?, ?, ?, ?, ?)",
                [
                    (cseq, row.body["idx"], canonical(row.body).decode(), row.pseudonym, row.salt)
                    for row in plan.rows
                ],
            )
            data = {
                "cutoff": cutoff,
                "spans": plan.spans,
                "removed": len(plan.removed),
                "rows": len(plan.rows),
                "accounting": accounting_digest([row.body for row in plan.rows]),
            }
            return self._append_locked(_system(AuditAction.COMPACTION, data), None, None, head)

    def erase(self, user_id: str) -> ErasureReport:
        """Unlink `user_id` from every entry and accounting row, under every audit key.

        Pseudonym and salt are set to NULL; the hashed commitment stays, and without its salt
        it no longer links to anyone. One `audit.erasure` entry records which rows were
        redacted, so verify can tell an erasure from tampering.
        """
        pseudonyms = list(self._keyring.pseudonyms_of(user_id).values())
        with self._locked(), self._transaction():
            marks = ",".join("?" * len(pseudonyms))
            seqs = [
                seq
                for (seq,) in self._db.execute(
                    f"SELECT seq FROM entries WHERE pseudonym IN ({marks}) ORDER BY seq", pseudonyms
                )
            ]
            rows = [
                [cseq, idx]
                for cseq, idx in self._db.execute(
                    f"SELECT cseq, idx FROM accounting WHERE pseudonym IN ({marks}) "
                    "ORDER BY cseq, idx",
                    pseudonyms,
                )
            ]
            if not seqs and not rows:
                return ErasureReport(entries=0, accounting=0, erasure_seq=None)
            self._db.execute(
                f"UPDATE entries SET pseudonym = NULL, salt = NULL WHERE pseudonym IN ({marks})",
                pseudonyms,
            )
            self._db.execute(
                f"UPDATE accounting SET pseudonym = NULL, salt = NULL WHERE pseudonym IN ({marks})",
                pseudonyms,
            )
            data = {"entries": seqs, "accounting": rows}
            entry = self._append_locked(_system(AuditAction.ERASURE, data), None, None)
        return ErasureReport(entries=len(seqs), accounting=len(rows), erasure_seq=entry.seq)

    # -- reading -----------------------------------------------------------------------------

    def entries(self, filter: AuditFilter | None = None) -> list[AuditEntry]:
        filter = filter or AuditFilter()
        where, args = [], []
        if filter.since is not None:
            where.append("json_extract(body, '$.ts') >= ?")
            args.append(filter.since)
        if filter.until is not None:
            where.append("json_extract(body, '$.ts') < ?")
            args.append(filter.until)
        if filter.actions is not None:
            marks = ",".join("?" * len(filter.actions))
            where.append(f"json_extract(body, '$.action') IN ({marks})")
            args.extend(sorted(filter.actions))
        if filter.pseudonyms is not None:
            where.append(f"pseudonym IN ({','.join('?' * len(filter.pseudonyms))})")
            args.extend(sorted(filter.pseudonyms))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._locked():
            rows = self._db.execute(
                f"SELECT seq, hash, body, pseudonym FROM entries {clause} ORDER BY seq", args
            ).fetchall()
        return [entry_from_row(seq, h, json.loads(body), p) for seq, h, body, p in rows]

    def accounting(self, pseudonyms: frozenset[str] | None = None) -> list[AccountingRow]:
        clause, args = "", []
        if pseudonyms is not None:
            clause = f"WHERE pseudonym IN ({','.join('?' * len(pseudonyms))})"
            args = sorted(pseudonyms)
        with self._locked():
            rows = self._db.execute(
                f"SELECT body, pseudonym FROM accounting {clause} ORDER BY cseq, idx", args
            ).fetchall()
        return [accounting_from_row(json.loads(body), p) for body, p in rows]

    def export_subject(self, user_id: str, filter: AuditFilter | None = None) -> SubjectExport:
        """The user's entries and accounting rows, found by their pseudonym under every key."""
        pseudonyms = self._keyring.pseudonyms_of(user_id)
        wanted = frozenset(pseudonyms.values())
        scoped = (filter or AuditFilter()).model_copy(update={"pseudonyms": wanted})
        return SubjectExport(
            pseudonyms=pseudonyms, entries=self.entries(scoped), accounting=self.accounting(wanted)
        )

    def verify(self) -> VerifyReport:
        with self._locked():
            entries = [
                StoredEntry(*row)
                for row in self._db.execute(
                    "SELECT seq, hash, body, pseudonym, salt FROM entries ORDER BY seq"
                )
            ]
            accounting = [
                StoredAccounting(*row)
                for row in self._db.execute(
                    "SELECT cseq, body, pseudonym, salt FROM accounting ORDER BY cseq, idx"
                )
            ]
            head = cp.read(self.head_path)
        # The head was signed by the key that was active when it was written: after a key
        # rotation that key may be retired, and still attests that moment.
        keys = self._signer.public_keys_at(head.ts) if head is not None else {}
        return verify_log(entries, accounting, head, keys)

    # -- internals ---------------------------------------------------------------------------

    def _append_locked(
        self,
        fields: dict[str, Any],
        pseudonym: str | None,
        salt: str | None,
        head: tuple[int, str] | None = None,
    ) -> AuditEntry:
        seq, prev = head or self._head()
        seq += 1
        body = {"v": BODY_VERSION, "seq": seq, "prev": prev, "ts": round(self._clock.now(), 6)}
        body.update(fields)
        hash_ = entry_hash(body)
        self._db.execute(
            "INSERT INTO entries (seq, hash, body, pseudonym, salt) VALUES (?, ?, ?, ?, ?)",
            (seq, hash_, canonical(body).decode(), pseudonym, salt),
        )
        self._pending_head = (seq, hash_, body["ts"])
        return entry_from_row(seq, hash_, body, pseudonym)

    def _head(self) -> tuple[int, str]:
        row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            return row[0], row[1]
        return 0, GENESIS  # an empty log (compaction keeps its own entries, so only a new one)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._pending_head: tuple[int, str, float] | None = None
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        if self._pending_head is not None:
            seq, hash_, ts = self._pending_head
            kid, key = self._signer.signing_key()
            cp.write(self.head_path, cp.sign(seq, hash_, ts, kid, key))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            except sqlite3.Error as error:
                raise AuditError(f"the audit log in {self.directory} failed: {error}") from error
            finally:
                os.close(fd)


def _system(action: AuditAction, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "action": action.value,
        "kid": None,
        "subject": None,
        "role": None,
        "model": None,
        "site": None,
        "job": None,
        "bytes_in": 0,
        "bytes_out": 0,
        "gpu_s": 0.0,
        "outcome": None,
        "data": data,
    }


def open_audit_log(
    data_dir: Path, keys_dir: Path | None, rotation_s: float | None, clock: Clock | None = None
) -> SqliteAuditLog:
    """The broker's audit log under `<data_dir>/audit`, keys from `keys_dir` ($EDIF_HOME/keys)."""
    signer = KeyStore(keys_dir, clock) if keys_dir else KeyStore.default(clock)
    keyring = AuditKeyring(signer.directory, rotation_s, clock)
    return SqliteAuditLog(Path(data_dir) / "audit", keyring, signer, clock)
