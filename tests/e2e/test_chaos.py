"""Chaos: 200 jobs from four researchers while the broker and agents are killed with SIGKILL.

A broker process of this test's own (fixed port and data directory, so each restart is the
same broker reopening its job store) serves four client processes running the unmodified
nnsight client; meanwhile the broker is SIGKILLed and restarted, and now and then a demo agent
is SIGKILLed (`edif up` restarts it). Every job must end COMPLETED with a result `torch.equal`
to the local run, or with a clear ERROR; none may be lost, and none may change its answer.
The longer run with figures is `bench/chaos.py`.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, wait

import httpx
import pytest
from chaos_harness import agent_pids, client_main
from processes import BrokerProcess

from edif.up import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

CLIENTS = 4
JOBS_PER_CLIENT = 50
DEADLINE_S = 300.0  # per job, from its first submission
AGENT_KILL_SPACING_S = 40.0  # let a killed agent come back before the next one goes


def test_no_job_is_lost_or_delivered_twice_under_sigkill(mesh) -> None:
    rng = random.Random(20261126)
    broker = BrokerProcess(mesh.home, "broker-chaos", free_port())
    broker.start()
    broker.wait_ready()
    tokens = [mesh.token(f"chaos-{i}@uni-example.eu") for i in range(CLIENTS)]
    kills: Counter[str] = Counter()
    try:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(CLIENTS, mp_context=context) as pool:
            futures = [
                pool.submit(
                    client_main,
                    i,
                    str(mesh.home),
                    broker.url,
                    tokens[i],
                    JOBS_PER_CLIENT,
                    1000 + i,
                    DEADLINE_S,
                )
                for i in range(CLIENTS)
            ]
            _make_chaos(futures, broker, mesh, rng, kills)
            outcomes = [outcome for future in futures for outcome in future.result()]
        summary = Counter(outcome.status for outcome in outcomes)
        print(f"chaos: {dict(summary)}, kills {dict(kills)}")
    finally:
        broker.stop()
        _wait_mesh_whole(mesh)

    assert len(outcomes) == CLIENTS * JOBS_PER_CLIENT
    assert kills["broker"] >= 2 and kills["agent"] >= 1
    lost = [o for o in outcomes if o.status == "LOST"]
    assert not lost, lost[:3]
    completed = [o for o in outcomes if o.status == "COMPLETED"]
    assert all(o.equal for o in completed), [o for o in completed if not o.equal][:3]
    errors = [o for o in outcomes if o.status == "ERROR"]
    assert all(len(o.description) > 20 for o in errors), errors[:3]
    # A finished job says the same thing when asked again: no second, different delivery.
    assert all(o.confirmed == o.status for o in outcomes), [
        o for o in outcomes if o.confirmed != o.status
    ][:3]
    # Jobs were really caught in flight by a broker death and still completed.
    assert any(o.resubmits or o.mode == "blocking" for o in completed)
    assert len(completed) >= 0.9 * len(outcomes), dict(summary)


def _make_chaos(futures, broker: BrokerProcess, mesh, rng: random.Random, kills: Counter) -> None:
    """Kill things at random moments until every client has finished."""
    last_agent_kill = time.monotonic()
    while not all(future.done() for future in futures):
        done, _ = wait(futures, timeout=rng.uniform(2.0, 6.0))
        if len(done) == len(futures):
            return
        # The first agent kill comes right after the first broker kill (a fast machine may
        # finish all jobs within one spacing), later ones at most once per spacing.
        first_agent = kills["agent"] == 0 and kills["broker"] >= 1
        agent_due = time.monotonic() - last_agent_kill > AGENT_KILL_SPACING_S
        if first_agent or (agent_due and rng.random() < 0.5):
            name, pid = rng.choice(sorted(agent_pids(mesh.home / "mesh.json").items()))
            try:
                os.kill(pid, signal.SIGKILL)
                kills["agent"] += 1
            except ProcessLookupError:
                pass
            last_agent_kill = time.monotonic()
        else:
            broker.kill()
            kills["broker"] += 1
            time.sleep(rng.uniform(0.2, 1.5))
            broker.start()
            broker.wait_ready()


def _wait_mesh_whole(mesh, timeout_s: float = 180.0) -> None:
    """Leave the shared demo mesh as we found it: every agent back and serving."""
    deadline = time.monotonic() + timeout_s
    expected = set(mesh.state["agents"])
    running: set[str] = set()
    while time.monotonic() < deadline:
        try:
            deployments = httpx.get(f"{mesh.url}/status", timeout=5).json()["deployments"]
            running = {
                name.split("/")[0]
                for name, entry in deployments.items()
                if entry["application_state"] == "RUNNING" and entry["deployment_level"] == "HOT"
            }
            if expected <= running:
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise AssertionError(f"the demo mesh did not recover its agents: running {running}")
