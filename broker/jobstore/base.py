"""The job store interface, and the SQL that both implementations share.

The broker writes a job here before it answers RECEIVED and after every lifecycle change; a
restarted broker reads the unfinished ones back and finishes them. Several broker replicas
may share one store (PostgreSQL), so each job row names the broker *instance* handling it:

- every write is conditional on `instance = me` (`save` returns False when another instance
  has taken the job over, and the caller stops handling it: fencing, so a broker that was
  only cut off for a while can never deliver a second result);
- each instance heartbeats a lease row; `claim_orphans` moves the unfinished jobs of instances
  whose lease ran out (and, once at start-up, of this instance's previous life) to the caller.

Statements are written once with `?` placeholders; a dialect supplies the DDL, connections and
transactions. All methods are blocking: the service calls them through `DurableJobs`, on one
thread of their own.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from broker.jobs import JobState
from broker.jobstore.records import JobRecord, record_from_row

TERMINAL = (JobState.COMPLETED.value, JobState.ERROR.value)


class JobStore(Protocol):
    def create(self, record: JobRecord, payload: bytes, instance: str, now: float) -> None: ...

    def save(self, record: JobRecord, instance: str, now: float) -> bool: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def payload(self, job_id: str) -> bytes | None: ...

    def heartbeat(self, instance: str, now: float) -> None: ...

    def claim_orphans(
        self, instance: str, now: float, lease_s: float, include_own: bool
    ) -> list[JobRecord]: ...

    def purge(self, finished_before: float) -> int: ...

    def counts(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class SqlJobStore(ABC):
    """`JobStore` over a DB-API connection; subclasses give the dialect."""

    placeholder = "?"

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Any]:
        """A cursor inside one transaction (committed on exit, rolled back on error)."""

    @abstractmethod
    def close(self) -> None: ...

    def _sql(self, statement: str) -> str:
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def _run(self, statement: str, params: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        with self._transaction() as cursor:
            cursor.execute(self._sql(statement), params)
            rows = cursor.fetchall() if cursor.description else []
        return iter(rows)

    # -- writes -------------------------------------------------------------------------------

    def create(self, record: JobRecord, payload: bytes, instance: str, now: float) -> None:
        with self._transaction() as cursor:
            cursor.execute(
                self._sql(
                    "INSERT INTO edif_jobs (id, state, owner, instance, created_at, updated_at,"
                    " body, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                (
                    record.id,
                    record.state.value,
                    record.owner_pseudonym,
                    instance,
                    record.created_at,
                    now,
                    record.to_json(),
                    payload,
                ),
            )

    def save(self, record: JobRecord, instance: str, now: float) -> bool:
        terminal = record.state.terminal
        with self._transaction() as cursor:
            cursor.execute(
                self._sql(
                    "UPDATE edif_jobs SET state = ?, body = ?, updated_at = ?"
                    + (", payload = NULL" if terminal else "")
                    + " WHERE id = ? AND instance = ?"
                ),
                (record.state.value, record.to_json(), now, record.id, instance),
            )
            return cursor.rowcount == 1

    def heartbeat(self, instance: str, now: float) -> None:
        with self._transaction() as cursor:
            cursor.execute(self._sql("DELETE FROM edif_brokers WHERE instance = ?"), (instance,))
            cursor.execute(
                self._sql("INSERT INTO edif_brokers (instance, seen_at) VALUES (?, ?)"),
                (instance, now),
            )

    def claim_orphans(
        self, instance: str, now: float, lease_s: float, include_own: bool
    ) -> list[JobRecord]:
        claim = secrets.token_hex(8)
        own = " OR instance = ?" if include_own else ""
        params: tuple[Any, ...] = (instance, claim, *TERMINAL, instance, now - lease_s)
        with self._transaction() as cursor:
            cursor.execute(
                self._sql(
                    "UPDATE edif_jobs SET instance = ?, claim = ?"
                    " WHERE state NOT IN (?, ?) AND ((instance <> ? AND instance NOT IN"
                    " (SELECT instance FROM edif_brokers WHERE seen_at >= ?))" + own + ")"
                ),
                params + ((instance,) if include_own else ()),
            )
            cursor.execute(
                self._sql(
                    "SELECT id, state, owner, created_at, body FROM edif_jobs"
                    " WHERE claim = ? AND instance = ? ORDER BY created_at, id"
                ),
                (claim, instance),
            )
            rows = cursor.fetchall()
        return [record_from_row(*row) for row in rows]

    def purge(self, finished_before: float) -> int:
        with self._transaction() as cursor:
            cursor.execute(
                self._sql("DELETE FROM edif_jobs WHERE state IN (?, ?) AND updated_at < ?"),
                (*TERMINAL, finished_before),
            )
            return max(cursor.rowcount, 0)

    # -- reads --------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        rows = list(
            self._run(
                "SELECT id, state, owner, created_at, body FROM edif_jobs WHERE id = ?", (job_id,)
            )
        )
        return record_from_row(*rows[0]) if rows else None

    def payload(self, job_id: str) -> bytes | None:
        rows = list(self._run("SELECT payload FROM edif_jobs WHERE id = ?", (job_id,)))
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else None

    def counts(self) -> dict[str, int]:
        rows = self._run("SELECT state, COUNT(*) FROM edif_jobs GROUP BY state")
        return {state: int(n) for state, n in rows}


def schema(blob_type: str, float_type: str) -> list[str]:
    """The two tables, in the dialect's type names."""
    return [
        "CREATE TABLE IF NOT EXISTS edif_jobs ("
        " id TEXT PRIMARY KEY, state TEXT NOT NULL, owner TEXT NOT NULL,"
        " instance TEXT NOT NULL, claim TEXT,"
        f" created_at {float_type} NOT NULL, updated_at {float_type} NOT NULL,"
        f" body TEXT NOT NULL, payload {blob_type})",
        "CREATE INDEX IF NOT EXISTS edif_jobs_open ON edif_jobs (state, instance)",
        "CREATE INDEX IF NOT EXISTS edif_jobs_claim ON edif_jobs (claim)",
        "CREATE TABLE IF NOT EXISTS edif_brokers ("
        f" instance TEXT PRIMARY KEY, seen_at {float_type} NOT NULL)",
    ]
