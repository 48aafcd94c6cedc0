"""Durable quota state: the policies governance set and the GPU-seconds usage ledger (SQLite).

One file (`<data_dir>/quotas.sqlite3`, WAL mode, so readers never block the broker's writes),
two tables:

- `policies(scope, name, policy_json, updated_at)`: scope is `role` or `group`; set at run time
  through the admin API and read back at start-up, so changes survive restarts.
- `charges(at, scope, name, gpu_seconds, job_id)`: one row per charge, `scope` `user` (name is
  the user's pseudonym, never the raw `sub`) or `group` (name is the group). Usage over any
  period is a sum over a time range, so changing a policy's period needs no migration.

Calls are short and synchronous; the broker makes them on its event loop (one row per finished
job, one indexed sum per admission).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from pydantic import BaseModel

from broker.quotas.policy import QuotaPolicy, Scope

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policies (
    scope TEXT NOT NULL,
    name TEXT NOT NULL,
    policy_json TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (scope, name)
);
CREATE TABLE IF NOT EXISTS charges (
    at REAL NOT NULL,
    scope TEXT NOT NULL,
    name TEXT NOT NULL,
    gpu_seconds REAL NOT NULL,
    job_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS charges_by_owner ON charges (scope, name, at);
"""


class UsageRow(BaseModel):
    scope: str  # "user" (name: pseudonym) or "group"
    name: str
    gpu_seconds: float
    jobs: int


class QuotaStore:
    """Policies and the usage ledger in one SQLite file."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, shared with to_thread callers
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- policies ----------------------------------------------------------------------------

    def policies(self, scope: Scope) -> dict[str, QuotaPolicy]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, policy_json FROM policies WHERE scope = ?", (scope.value,)
            ).fetchall()
        return {name: QuotaPolicy.model_validate(json.loads(raw)) for name, raw in rows}

    def put_policy(self, scope: Scope, name: str, policy: QuotaPolicy, at: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO policies (scope, name, policy_json, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (scope, name) DO UPDATE SET "
                "policy_json = excluded.policy_json, updated_at = excluded.updated_at",
                (scope.value, name, policy.model_dump_json(), at),
            )

    def delete_policy(self, scope: Scope, name: str) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM policies WHERE scope = ? AND name = ?", (scope.value, name)
            )
        return cursor.rowcount > 0

    # -- ledger ------------------------------------------------------------------------------

    def charge(
        self, entries: list[tuple[str, str]], gpu_seconds: float, at: float, job_id: str = ""
    ) -> None:
        """Record `gpu_seconds` against every `(scope, name)` in `entries`, atomically."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO charges (at, scope, name, gpu_seconds, job_id) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(at, scope, name, gpu_seconds, job_id) for scope, name in entries],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def used(self, scope: str, name: str, start: float, end: float) -> float:
        with self._lock:
            (total,) = self._db.execute(
                "SELECT COALESCE(SUM(gpu_seconds), 0) FROM charges "
                "WHERE scope = ? AND name = ? AND at >= ? AND at < ?",
                (scope, name, start, end),
            ).fetchone()
        return float(total)

    def charges(self, scope: str, start: float) -> list[tuple[str, float, float]]:
        """Every charge to `scope` since `start`, as (name, GPU-seconds, at), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, gpu_seconds, at FROM charges WHERE scope = ? AND at >= ? ORDER BY at",
                (scope, start),
            ).fetchall()
        return [(name, float(gpu_s), float(at)) for name, gpu_s, at in rows]

    def usage(self, start: float, end: float) -> list[UsageRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT scope, name, SUM(gpu_seconds), COUNT(*) FROM charges "
                "WHERE at >= ? AND at < ? GROUP BY scope, name ORDER BY scope, name",
                (start, end),
            ).fetchall()
        return [UsageRow(scope=s, name=n, gpu_seconds=g, jobs=j) for s, n, g, j in rows]
