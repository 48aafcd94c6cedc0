"""Model workers hold no secrets: nothing secret-looking in their environment, no key files open.

Read from outside, through /proc, so the check does not depend on what a job may do inside.
The mesh fixture starts `edif up` with a planted secret variable in its environment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import PLANTED_SECRET

pytestmark = pytest.mark.e2e

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_?KEY|PRIVATE|CREDENTIAL", re.I)


def _processes(prefix: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmdline.startswith(prefix):
            pids.append(int(entry.name))
    return pids


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
    return dict(pairs)


def test_workers_environment_has_no_secrets(mesh) -> None:
    workers = _processes("ray::ModelWorker")
    assert len(workers) >= 4, "expected one worker per demo deployment"
    for pid in workers:
        env = _environ(pid)
        assert PLANTED_SECRET not in env
        assert "hunter2-planted" not in "".join(env.values())
        leaked = sorted(k for k in env if _SECRET_NAME.search(k))
        assert not leaked, f"worker {pid} has secret-looking variables {leaked}"


def test_workers_hold_no_key_files_open(mesh) -> None:
    keys = (Path(mesh.home) / "keys").resolve()
    for pid in _processes("ray::ModelWorker"):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            assert not target.startswith(str(keys)), f"worker {pid} has {target} open"


def test_workers_run_at_normal_priority(mesh) -> None:
    """Ray starts its workers at nice 15; a model worker is on every job's path, so the
    clusters the agent or the demo start run them at 0 (site_agent/ray_pool.py)."""
    ours = [
        pid
        for pid in _processes("ray::ModelWorker")
        if _environ(pid).get("EDIF_HOME") == str(mesh.home)
    ]
    assert len(ours) >= 4, "expected one worker per demo deployment"
    for pid in ours:
        assert os.getpriority(os.PRIO_PROCESS, pid) == 0, f"worker {pid} runs niced"
