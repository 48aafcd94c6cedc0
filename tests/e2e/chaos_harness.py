"""Chaos harness: researchers keep submitting while brokers and agents are killed with SIGKILL.

Shared by `tests/e2e/test_chaos.py` (≥ 200 jobs) and `bench/chaos.py` (≥ 1000 jobs, figures).

- `BrokerProcess` runs `edif broker run` on a fixed port and data directory, so a restart after
  `kill()` is the same broker instance reopening its job store (what a service manager does).
- `client_main` is one researcher in a process of its own (nnsight's tracing is not meant to be
  shared between threads): it runs jobs on the tiny GPT-2 with the unmodified nnsight client,
  half blocking (websocket), half non-blocking (poll). When the broker dies under a blocking
  job, the client does what a researcher would: polls the job by its id until it ends. A
  submission that fails because the broker is down is submitted again (the user saw an error).
- Every job ends as an `Outcome`: COMPLETED (with `torch.equal` against the local run), ERROR
  (with the broker's text), or LOST (no terminal status before the deadline). After its first
  terminal status each job is polled once more and must say the same thing (no second,
  different delivery).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower stands in paris",
    "The cat sat on the mat",
    "Once upon a time there was",
]


@dataclass
class Outcome:
    client: int
    index: int
    mode: str  # "blocking" | "poll"
    status: str  # "COMPLETED" | "ERROR" | "LOST"
    job_id: str | None = None
    equal: bool | None = None  # COMPLETED: torch.equal to the local run
    description: str = ""
    resubmits: int = 0  # submissions refused because the broker was down
    seconds: float = 0.0
    confirmed: str = ""  # the status a second poll reported
    notes: list[str] = field(default_factory=list)


def client_main(
    client: int, home: str, host: str, token: str, jobs: int, seed: int, deadline_s: float
) -> list[Outcome]:
    """One researcher's session (run in its own process)."""
    import anyio._backends._asyncio  # noqa: F401  (before nnsight: spec §11.4)
    import torch
    from nnsight import CONFIG

    from edif.demo import TINY_GPT2, load

    torch.set_num_threads(1)  # bit-identity with the sites' single-threaded workers
    CONFIG.API.HOST, CONFIG.API.APIKEY = host, token
    CONFIG.APP.REMOTE_LOGGING = False
    remote = load(TINY_GPT2, home=Path(home))
    local = load(TINY_GPT2, home=Path(home), dispatch=True)
    expected = {prompt: _logits(local, prompt) for prompt in PROMPTS}
    rng = random.Random(seed)
    outcomes = []
    for index in range(jobs):
        prompt = rng.choice(PROMPTS)
        mode = "blocking" if rng.random() < 0.5 else "poll"
        job = _Job(remote, host, token, prompt, expected[prompt], deadline_s)
        outcome = job.run_blocking() if mode == "blocking" else job.run_polled()
        outcome.client, outcome.index, outcome.mode = client, index, mode
        outcomes.append(outcome)
    return outcomes


# The traced blocks below mention only `model`: nnsight ships what a block refers to, and a
# reference to harness objects would ship this module (the sites rightly refuse `time`).
def _logits(model, prompt: str, **kwargs):
    with model.trace(prompt, **kwargs):
        logits = model.lm_head.output.save()
    return logits


def _submit(model, prompt: str, host: str) -> str:
    """A non-blocking submission; returns the job id the broker answered."""
    with model.trace(prompt, remote=host, blocking=False) as tracer:
        logits = model.lm_head.output.save()  # noqa: F841 - the poll returns it by this name
    return tracer.backend.job_id


class _Job:
    def __init__(self, model, host, token, prompt, expected, deadline_s) -> None:
        self.model, self.host, self.token = model, host, token
        self.prompt, self.expected = prompt, expected
        self.began = time.monotonic()
        self.deadline = self.began + deadline_s
        self.resubmits = 0

    def run_blocking(self) -> Outcome:
        from nnsight.intervention.backends.remote import RemoteError

        while time.monotonic() < self.deadline:
            backend = _IdRecordingBackend(
                self.model.to_model_key(),
                host=self.host,
                api_key=self.token,
                env=self.model._remoteable_get_env(),
            )
            try:
                logits = _logits(self.model, self.prompt, backend=backend)
                return self._completed(backend.job_id, logits)
            except RemoteError as error:
                if backend.job_id is not None:  # the broker's own ERROR for this job
                    return self._confirmed(Outcome(0, 0, "", "ERROR", backend.job_id), str(error))
                self._resubmit_later()
            except Exception:  # the websocket died with the broker
                if backend.job_id is not None:
                    return self._poll(backend.job_id)
                self._resubmit_later()
        return self._outcome("LOST", None, "never submitted")

    def run_polled(self) -> Outcome:
        from nnsight.intervention.backends.remote import RemoteError

        while time.monotonic() < self.deadline:
            try:
                return self._poll(_submit(self.model, self.prompt, self.host))
            except RemoteError:
                self._resubmit_later()
        return self._outcome("LOST", None, "never submitted")

    def _poll(self, job_id: str) -> Outcome:
        from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

        backend = RemoteBackend(
            self.model.to_model_key(),
            host=self.host,
            api_key=self.token,
            blocking=False,
            job_id=job_id,
        )
        while time.monotonic() < self.deadline:
            try:
                result = backend.poll()
            except RemoteError as error:
                return self._confirmed(self._outcome("ERROR", job_id, str(error)), str(error))
            except (httpx.HTTPError, OSError):
                time.sleep(0.3)  # the broker is down or restarting
                continue
            if result is not None:
                return self._completed(job_id, result["logits"])
            time.sleep(0.1)
        return self._outcome("LOST", job_id, f"no terminal status (last: {backend.status})")

    def _completed(self, job_id: str | None, logits) -> Outcome:
        import torch

        outcome = self._outcome("COMPLETED", job_id, "")
        outcome.equal = bool(torch.equal(logits, self.expected))
        return self._confirmed(outcome, "")

    def _confirmed(self, outcome: Outcome, description: str) -> Outcome:
        """Poll once more: a finished job must keep saying the same thing."""
        from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

        outcome.description = description
        if outcome.job_id is None:
            return outcome
        backend = RemoteBackend(
            self.model.to_model_key(),
            host=self.host,
            api_key=self.token,
            blocking=False,
            job_id=outcome.job_id,
        )
        for _ in range(200):
            try:
                outcome.confirmed = "COMPLETED" if backend.poll() is not None else "PENDING"
                break
            except RemoteError:
                outcome.confirmed = "ERROR"
                break
            except (httpx.HTTPError, OSError):
                time.sleep(0.3)
        return outcome

    def _outcome(self, status: str, job_id: str | None, description: str) -> Outcome:
        return Outcome(
            0,
            0,
            "",
            status,
            job_id,
            None,
            description,
            self.resubmits,
            time.monotonic() - self.began,
        )

    def _resubmit_later(self) -> None:
        self.resubmits += 1
        time.sleep(0.5)


def _recording_backend_class():
    from nnsight.intervention.backends.remote import RemoteBackend

    class IdRecordingBackend(RemoteBackend):
        """The stock client, remembering the job id the broker answered (for a later poll)."""

        def _post(self, request, blob):
            response = super()._post(request, blob)
            self.job_id = response.id
            return response

    return IdRecordingBackend


def _IdRecordingBackend(*args, **kwargs):  # noqa: N802 - a class built lazily (nnsight import)
    return _recording_backend_class()(*args, **kwargs)


def agent_pids(state_file: Path) -> dict[str, int]:
    import json

    state = json.loads(state_file.read_text())
    return {name: int(info["pid"]) for name, info in state["agents"].items()}
