"""The embedded job store: one SQLite file in WAL mode under the broker's data directory.

WAL lets pollers read while a job is written. `synchronous=NORMAL` (the default here) makes a
committed job survive a crash of the broker process, which is what SIGKILL tests; `full` also
survives a power cut, at one fsync per write (`EDIF_BROKER_JOB_STORE_SYNC=full`).
`secure_delete` overwrites what a job's record held once it is rewritten or purged, so a
finished job's payload and its owner's `sub` do not linger in free pages.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.jobstore.base import SqlJobStore, schema


class SqliteJobStore(SqlJobStore):
    def __init__(self, path: Path | str, synchronous: str = "normal") -> None:
        memory = str(path) == ":memory:"
        if not memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _touch_private(Path(path))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 10000")
        if not memory:
            self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA secure_delete = ON")
        for statement in schema("BLOB", "REAL"):
            self._db.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cursor = self._db.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _touch_private(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would follow the umask)."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
