"""The job state machine: the allowed transitions, and nothing else."""

from __future__ import annotations

import re

import pytest
from broker_fakes import GPT2_KEY

from broker.jobs import TRANSITIONS, IllegalTransition, Job, JobState, Submission, new_job_id
from broker.modelkey import parse_model_key

S = JobState


def make_job() -> Job:
    submission = Submission(
        model_key=parse_model_key(GPT2_KEY),
        raw_model_key=GPT2_KEY,
        compress=False,
        env_json="{}",
        session_id="",
        client_version="0.8.1",
        base_url="http://broker.test",
    )
    return Job(new_job_id(), "alice@example.org", "u-1", submission, 0.0, payload=b"blob")


def walk(job: Job, *states: JobState) -> None:
    for at, state in enumerate(states):
        job.advance(state, float(at))


def test_happy_path_and_redispatch() -> None:
    job = make_job()
    walk(job, S.QUEUED, S.DISPATCHED, S.RUNNING, S.QUEUED, S.DISPATCHED, S.RUNNING, S.COMPLETED)
    assert job.state is S.COMPLETED and job.state.terminal
    assert job.entered_at[S.RUNNING] == 5.0  # the latest entry counts


def test_dispatched_may_complete_without_running() -> None:
    job = make_job()
    walk(job, S.QUEUED, S.DISPATCHED, S.COMPLETED)


@pytest.mark.parametrize("start", [S.RECEIVED, S.QUEUED, S.DISPATCHED, S.RUNNING])
def test_every_open_state_can_fail(start: JobState) -> None:
    assert S.ERROR in TRANSITIONS[start]


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ((), S.RUNNING),
        ((), S.COMPLETED),
        ((), S.DISPATCHED),
        ((S.QUEUED,), S.RUNNING),
        ((S.QUEUED,), S.QUEUED),
        ((S.QUEUED, S.DISPATCHED, S.RUNNING), S.DISPATCHED),
        ((S.QUEUED, S.DISPATCHED, S.COMPLETED), S.ERROR),
        ((S.ERROR,), S.COMPLETED),
        ((S.ERROR,), S.ERROR),
    ],
)
def test_illegal_transitions_raise(path: tuple[JobState, ...], illegal: JobState) -> None:
    job = make_job()
    walk(job, *path)
    before = job.state
    with pytest.raises(IllegalTransition):
        job.advance(illegal, 99.0)
    assert job.state is before


def test_table_covers_every_state_and_terminals_have_no_exit() -> None:
    assert set(TRANSITIONS) == set(JobState)
    assert {s for s in JobState if s.terminal} == {S.COMPLETED, S.ERROR}
    assert all(not TRANSITIONS[s] for s in JobState if s.terminal)


def test_job_ids_are_path_safe_and_unique() -> None:
    ids = {new_job_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{16,}", i) for i in ids)


def test_repr_hides_the_owner_and_payload() -> None:
    text = repr(make_job())
    assert "alice" not in text
    assert "blob" not in text
