"""The job store for several broker replicas: PostgreSQL through psycopg 3.

Same statements and fencing as the SQLite store (`broker.jobstore.base`); replicas share the
tables, and a replica's lease row tells the others whether its unfinished jobs are orphans.
The DSN is a secret (it may carry a password): it comes from `EDIF_BROKER_JOB_STORE_DSN` and
is never logged. psycopg is an optional dependency (`pip install edif-mesh[postgres]`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from broker.jobstore.base import SqlJobStore, schema
from edif.errors import ConfigError


class PostgresJobStore(SqlJobStore):
    placeholder = "%s"

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ConfigError(
                "the PostgreSQL job store needs psycopg: pip install 'edif-mesh[postgres]'"
            ) from error
        try:
            self._db = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as error:
            raise ConfigError(
                f"cannot connect to the PostgreSQL job store: {type(error).__name__}"
            ) from None
        self._lock = threading.Lock()
        with self._transaction() as cursor:
            # One replica creates the tables; the others wait on the lock, then find them.
            cursor.execute("SELECT pg_advisory_xact_lock(7301)")
            for statement in schema("BYTEA", "DOUBLE PRECISION"):
                cursor.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock, self._db.transaction(), self._db.cursor() as cursor:
            yield cursor

    def close(self) -> None:
        with self._lock:
            self._db.close()
