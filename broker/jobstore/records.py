"""A job as the job store keeps it: a flat, JSON-serialisable record, and the way back.

`to_record(job)` and `to_job(record, payload)` are the only translation between the live
`Job` the service works on and what survives a broker crash. What is stored, and why:

- the lifecycle state, the site and the sites tried, the latest status (what
  `GET /response/{id}` serves) and the result reference, so a restarted broker answers pollers
  and serves result URLs it handed out before the crash;
- the submission (model key text, compression, env, client version, base URL) and the owner's
  groups, so an unfinished job can be routed again;
- the owner's pseudonym (ownership checks) and, only while the job is unfinished, the owner's
  `sub`: a recovered job still needs it for its quota charge and audit entry. A finished job's
  record is rewritten without it.

Monotonic timestamps (`Job.entered_at`) mean nothing in another process and are not stored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from broker.jobs import Job, JobState, Submission
from broker.modelkey import parse_model_key
from broker.results import ResultRef
from broker.wire import StatusMessage


@dataclass(frozen=True)
class JobRecord:
    id: str
    state: JobState
    owner_pseudonym: str
    created_at: float
    body: dict[str, Any]  # everything else, as JSON-ready values

    def to_json(self) -> str:
        return json.dumps(self.body, separators=(",", ":"), sort_keys=True)


def to_record(job: Job) -> JobRecord:
    """The record of `job` as it stands now."""
    sub = job.submission
    body: dict[str, Any] = {
        "owner_sub": "" if job.state.terminal else job.owner_sub,
        "groups": list(job.owner_groups),
        "submission": {
            "raw_model_key": sub.raw_model_key,
            "compress": sub.compress,
            "env_json": sub.env_json,
            "session_id": sub.session_id,
            "client_version": sub.client_version,
            "base_url": sub.base_url,
        },
        "site": job.site,
        "attempts": list(job.attempts),
        "latest": job.latest.model_dump(mode="json") if job.latest is not None else None,
        "result": asdict(job.result) if job.result is not None else None,
        "meta": job.meta,
    }
    return JobRecord(job.id, job.state, job.owner_pseudonym, job.created_at, body)


def to_job(record: JobRecord, payload: bytes | None) -> Job:
    """A live `Job` from `record` (and its payload, kept while it is unfinished)."""
    body = record.body
    sub = body["submission"]
    submission = Submission(
        model_key=parse_model_key(sub["raw_model_key"]),
        raw_model_key=sub["raw_model_key"],
        compress=bool(sub["compress"]),
        env_json=sub["env_json"],
        session_id=sub["session_id"],
        client_version=sub["client_version"],
        base_url=sub["base_url"],
    )
    latest = body.get("latest")
    result = body.get("result")
    return Job(
        id=record.id,
        owner_sub=body.get("owner_sub", ""),
        owner_pseudonym=record.owner_pseudonym,
        submission=submission,
        created_at=record.created_at,
        owner_groups=tuple(body.get("groups", ())),
        payload=payload or b"",
        state=record.state,
        site=body.get("site"),
        latest=StatusMessage.model_validate(latest) if latest is not None else None,
        result=ResultRef(**result) if result is not None else None,
        meta=dict(body.get("meta") or {}),
        attempts=list(body.get("attempts") or ()),
    )


def record_from_row(job_id: str, state: str, owner: str, created_at: float, body: str) -> JobRecord:
    return JobRecord(job_id, JobState(state), owner, float(created_at), json.loads(body))
