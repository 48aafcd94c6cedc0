"""Fair-share queueing on the real mesh with the unmodified nnsight client (AsyncRemoteBackend).

A heavy user queues a backlog of slow jobs on `edif-demo/tiny-llama` (one worker serves users
outside FAU: heilbronn-demo), then a light user submits one job. The broker's fair-share queue
grants the light job the worker as soon as the heavy user has used some GPU-seconds, so it
completes long before the backlog drains; while it waits, its client gets QUEUED statuses that
say its position. Its result is bit-identical to a local run.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from nnsight.intervention.backends.remote import AsyncRemoteBackend

from edif.demo import TINY_LLAMA, load

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"
HEAVY_JOBS = 6
SPIN = 4_000_000  # about half a second of Python on a demo site (failover bench: 8M ~ 1 s)
POSITION = re.compile(
    r"^Your job is queued \(position (\d+) of (\d+) for model edif-demo/tiny-llama"
)


def _submit(model, url: str, token: str, spin: int) -> AsyncRemoteBackend:
    backend = AsyncRemoteBackend(
        model.to_model_key(), host=url, api_key=token, env=model._remoteable_get_env()
    )
    with model.trace(PROMPT, backend=backend):
        n = 0
        while n < spin:
            n += 1
        logits = model.lm_head.output.save()  # noqa: F841
    return backend


async def _follow(backend: AsyncRemoteBackend) -> tuple[list, dict | None, float]:
    """Every status update the client got, the saves, and when the stream ended."""
    updates, saves = [], None
    async for update in backend:
        if isinstance(update, dict):
            saves = update
        else:
            updates.append(update)
    return updates, saves, time.monotonic()


async def test_a_light_job_is_not_stuck_behind_a_heavy_backlog(mesh) -> None:
    # One receiving thread per open websocket (the client's recv blocks a thread).
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(HEAVY_JOBS + 4))
    tag = uuid.uuid4().hex[:8]  # fresh users: nobody's earlier usage counts
    heavy_token = mesh.token(f"heavy-{tag}@uni-example.eu")
    light_token = mesh.token(f"light-{tag}@uni-example.eu")
    remote = load(TINY_LLAMA, home=mesh.home)

    heavy = [_submit(remote, mesh.url, heavy_token, SPIN) for _ in range(HEAVY_JOBS)]
    light = _submit(remote, mesh.url, light_token, 0)
    outcomes = await asyncio.gather(*(_follow(b) for b in [*heavy, light]))

    heavy_outcomes, (light_updates, light_saves, light_done) = outcomes[:-1], outcomes[-1]
    for updates, saves, _ in outcomes:
        assert saves is not None, [u.description for u in updates]
        assert updates[-1].status.value == "COMPLETED"
    heavy_done = sorted(done for _, _, done in heavy_outcomes)
    # Fair share: the light job runs as soon as the heavy user has used the worker once
    # (twice if a heavy job had already started before the light one arrived). FIFO would
    # have put it behind all HEAVY_JOBS jobs.
    assert light_done < heavy_done[-1]
    assert sum(done < light_done for done in heavy_done) <= 2, (heavy_done, light_done)

    queued = [u.description for u in light_updates if u.status.value == "QUEUED"]
    positions = [POSITION.match(text) for text in queued]
    assert any(positions), queued
    index, of = (int(g) for g in next(m for m in positions if m).groups())
    assert 1 <= index <= of <= HEAVY_JOBS + 1

    local = load(TINY_LLAMA, home=mesh.home, dispatch=True)
    with local.trace(PROMPT):
        expected = local.lm_head.output.save()
    assert torch.equal(light_saves["logits"], expected)
