"""Job records and the job state machine the broker owns.

    RECEIVED -> QUEUED -> DISPATCHED -> RUNNING -> COMPLETED | ERROR
    DISPATCHED/RUNNING -> QUEUED          (a site failed; the job waits for another one)

Every non-terminal state may also go to ERROR, and DISPATCHED may go straight to COMPLETED (a
fast site need not report RUNNING). `TRANSITIONS` is the only place these rules live; `Job.advance`
enforces them, so a bug that would skip or repeat a terminal state fails loudly instead of
sending the client a second COMPLETED.

A `Job` keeps the owner's real `sub` in memory for ownership checks; it is excluded from `repr`
and must never be logged: logs use `owner_pseudonym`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from broker.modelkey import ModelKey
from broker.results import ResultRef
from broker.wire import StatusMessage, WireStatus


class JobState(StrEnum):
    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.ERROR)


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset({JobState.QUEUED, JobState.ERROR}),
    JobState.QUEUED: frozenset({JobState.DISPATCHED, JobState.ERROR}),
    JobState.DISPATCHED: frozenset(
        {JobState.RUNNING, JobState.QUEUED, JobState.COMPLETED, JobState.ERROR}
    ),
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.COMPLETED, JobState.ERROR}),
    JobState.COMPLETED: frozenset(),
    JobState.ERROR: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change the machine does not allow: always a broker bug, never a client error."""


def new_job_id() -> str:
    """An unguessable, URL-path-safe id (the client interpolates it into `/response/{id}`)."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class Submission:
    """What a validated POST /request asked for."""

    model_key: ModelKey
    raw_model_key: str
    compress: bool
    env_json: str
    session_id: str
    client_version: str
    base_url: str  # where result URLs point when no public_url is configured


@dataclass(eq=False)
class Job:
    id: str
    owner_sub: str = field(repr=False)  # never log: use owner_pseudonym
    owner_pseudonym: str
    submission: Submission
    created_at: float  # wall clock, seconds since the epoch
    owner_groups: tuple[str, ...] = ()  # for site sovereignty in routing
    payload: bytes = field(default=b"", repr=False)  # kept for re-dispatch, dropped at the end
    state: JobState = JobState.RECEIVED
    site: str | None = None
    latest: StatusMessage | None = None  # the last lifecycle status, as GET /response serves it
    result: ResultRef | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    entered_at: dict[JobState, float] = field(default_factory=dict)  # monotonic, latest entry
    attempts: list[str] = field(default_factory=list)  # sites tried, in order

    def advance(self, to: JobState, at: float) -> None:
        """Move to `to` at monotonic time `at`, or raise `IllegalTransition`."""
        if to not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"job {self.id}: {self.state} -> {to} is not allowed")
        self.state = to
        self.entered_at[to] = at

    def record(self, message: StatusMessage) -> None:
        """Keep `message` as the latest status (LOG lines are not statuses and are not kept)."""
        if message.status is not WireStatus.LOG:
            self.latest = message
