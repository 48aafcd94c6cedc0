"""Failover benchmark: time from a site agent's death to the job's completion elsewhere.

Starts `edif up --demo` (broker + three demo sites), then repeatedly: submits a job that runs
about a second on `edif-demo/tiny-gpt2` (hosted at two sites), waits until the broker reports
it RUNNING at a site, kills that site's agent with SIGKILL, and polls until the job completes
at the other site. Reported per run:

- `recovery_s`: kill → COMPLETED seen by a poller (what the researcher waits beyond normal);
- `execution_s`: the survivor's own execution time of the re-run job (from `meta`);
- `overhead_s` = recovery_s − execution_s: detection + re-dispatch + result delivery
  (target ≤ 2 s).

Between runs it waits until the killed site has been restarted and is RUNNING again.
Usage: .venv/bin/python bench/failover.py [--runs 5] [--out bench/out/failover.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio._backends._asyncio  # noqa: F401, I001 - before nnsight (spec §11.4)
import httpx
from nnsight import CONFIG

from auth.keys import KeyStore
from auth.roles import Role
from auth.tokens import TokenIssuer
from edif.demo import TINY_GPT2, load

PROMPT = "The capital of France is"
GPT2_SITES = ("ansbach-demo", "heilbronn-demo")
SPIN = 8_000_000


def start_mesh(
    home: Path, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, dict]:
    """`edif up --demo` under `home` (with `extra_env`, e.g. broker settings); its state."""
    state_file = home / "mesh.json"
    env = {**os.environ, "EDIF_HOME": str(home), "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    log = open(home / "edif-up.log", "ab")  # noqa: SIM115
    argv = [sys.executable, "-m", "edif", "up", "--demo", "--state-file", str(state_file)]
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not state_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"edif up failed; see {home / 'edif-up.log'}")
        time.sleep(0.2)
    return proc, json.loads(state_file.read_text())


def wait_running(url: str, sites: tuple[str, ...], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            deployments = httpx.get(f"{url}/status", timeout=5).json()["deployments"]
        except httpx.HTTPError:
            deployments = {}
        mine = [d for n, d in deployments.items() if n.split("/")[0] in sites]
        if mine and all(d["application_state"] == "RUNNING" for d in mine):
            return
        time.sleep(0.3)
    raise RuntimeError(f"sites {sites} not RUNNING")


def latest(url: str, job_id: str, token: str) -> dict:
    reply = httpx.get(f"{url}/response/{job_id}", headers={"ndif-api-key": token}, timeout=10)
    return reply.json() if reply.status_code == 200 else {}


def one_run(url: str, home: Path, model, token: str) -> dict:
    with model.trace(PROMPT, remote=True, blocking=False) as tracer:
        spin = 0
        while spin < SPIN:
            spin += 1
        logits = model.lm_head.output.save()  # noqa: F841
    job_id = tracer.backend.job_id
    while (status := latest(url, job_id, token)).get("status") != "RUNNING":
        time.sleep(0.01)
    victim = status["description"].removeprefix("Your job is running at site ").rstrip(".")
    pid = json.loads((home / "mesh.json").read_text())["agents"][victim]["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    result = None
    while result is None:
        result = tracer.backend()
        time.sleep(0.005)
    recovery = time.monotonic() - killed
    meta = tracer.backend.meta or {}
    execution = float(meta.get("execution_s", 0.0))
    return {
        "victim": victim,
        "survivor": meta.get("site"),
        "recovery_s": round(recovery, 3),
        "execution_s": round(execution, 3),
        "overhead_s": round(recovery - execution, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="edif-failover-"))
    proc, state = start_mesh(home)
    url = state["broker_url"]
    try:
        wait_running(url, GPT2_SITES)
        token = TokenIssuer(KeyStore(home / "keys")).issue("bench", Role.RESEARCHER, 7200)
        CONFIG.API.HOST, CONFIG.API.APIKEY = url, token
        CONFIG.APP.REMOTE_LOGGING = False
        model = load(TINY_GPT2, home=home)
        runs = []
        for i in range(args.runs):
            run = one_run(url, home, model, token)
            runs.append(run)
            print(f"run {i}: {run}", flush=True)
            wait_running(url, GPT2_SITES)  # the killed site is back before the next kill
        overheads = [r["overhead_s"] for r in runs]
        summary = {
            "runs": runs,
            "overhead_p50_s": statistics.median(overheads),
            "overhead_max_s": max(overheads),
            "recovery_p50_s": statistics.median(r["recovery_s"] for r in runs),
        }
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
