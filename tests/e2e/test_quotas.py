"""Fair-use quotas against the real mesh and the unmodified nnsight client: governance sets a
tiny GPU-seconds budget for a group over the admin API; a researcher of that group runs one job
(it completes, bit-identical to local, and is charged), and the next one is refused with a
`RemoteError` that says which budget, the use, the limit and when it resets."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import torch
from nnsight import CONFIG
from nnsight.intervention.backends.remote import RemoteError

from auth.roles import Role
from edif.demo import TINY_GPT2, load

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"


def _charged(mesh, staff: dict, group: str) -> float:
    """The group's GPU-seconds today, once the finished job's charge reached the ledger."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = httpx.get(f"{mesh.url}/admin/api/usage", headers=staff, timeout=10).json()["rows"]
        used = [r["gpu_seconds"] for r in rows if (r["scope"], r["name"]) == ("group", group)]
        if used:
            return used[0]
        time.sleep(0.1)
    raise AssertionError(f"no GPU-seconds charged to group {group}")


def test_gpu_budget_lets_one_job_finish_and_refuses_the_next(mesh) -> None:
    group = f"quota-e2e-{uuid.uuid4().hex[:8]}"  # a fresh group: nothing else is throttled
    staff = {"ndif-api-key": mesh.token("gov@uni-example.eu", Role.GOVERNANCE)}
    researcher = mesh.token("quota-tester@uni-example.eu", groups=(group,))

    denied = httpx.get(
        f"{mesh.url}/admin/api/quotas", headers={"ndif-api-key": researcher}, timeout=10
    )
    assert denied.status_code == 403
    reply = httpx.put(
        f"{mesh.url}/admin/api/quotas/group/{group}",
        json={"gpu_seconds_per_period": 1e-9, "period": "day"},
        headers=staff,
        timeout=10,
    )
    assert reply.status_code == 200, reply.text

    remote = load(TINY_GPT2, home=mesh.home)
    local = load(TINY_GPT2, home=mesh.home, dispatch=True)
    saved = (CONFIG.API.HOST, CONFIG.API.APIKEY)
    CONFIG.API.HOST, CONFIG.API.APIKEY = mesh.url, researcher
    try:
        with remote.trace(PROMPT, remote=True):
            logits = remote.lm_head.output.save()
        with local.trace(PROMPT):
            expected = local.lm_head.output.save()
        assert torch.equal(logits, expected)
        assert _charged(mesh, staff, group) > 0

        with pytest.raises(RemoteError) as info:
            with remote.trace(PROMPT, remote=True):
                _ = remote.lm_head.output.save()
    finally:
        CONFIG.API.HOST, CONFIG.API.APIKEY = saved
    message = str(info.value)
    assert "Failed to send request: Quota exceeded: GPU-seconds budget (yours, per day)" in message
    assert "of 1e-09 GPU-seconds" in message and "resets at" in message, message
