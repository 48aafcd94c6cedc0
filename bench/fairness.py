"""Fair-share benchmark: one heavy user's 100 jobs against five light users' 5 each, one model.

    .venv/bin/python bench/fairness.py [--modes fair,fifo] [--scenarios together,backlog]
        [--heavy-jobs 100] [--light-users 5] [--light-jobs 5] [--spin 500000]
        [--model edif-demo/tiny-gpt2] [--half-life S] [--senders 8] [--out FILE.json]

Flow, per mode: a temporary `$EDIF_HOME`; `edif up --demo` as a subprocess (broker, the three
demo sites, one local Ray) with the mode's broker settings in its environment; researcher tokens
issued with the mesh's own keys (fresh users per scenario). Per scenario, the unmodified nnsight
0.8.1 client first captures and serializes every job (a trace that spins `--spin` iterations of
Python on the site, ~0.4 s at 500k on the busy development machine, and saves the logits), then
`--senders` threads send them all at once in the scenario's order (`AsyncRemoteBackend`'s own
subscribe + POST, split from the serialization by a thin subclass so that sending is not slowed
by it). One thread per job reads its websocket with the client's `parse` / `download_result`
and timestamps every status update as it arrives. `edif-demo/tiny-gpt2` is served by two demo
sites: two jobs run at once.

Scenarios (`--scenarios`):

- `together`: everyone submits at the same moment (round robin over the users while each has
  jobs left), the issue's "all submitted at once";
- `backlog`: the heavy user's 100 jobs are sent first, then the light users' (the heavy user
  has a head start and a queued backlog when the light users arrive).

Modes (`--modes`):

- `fair`: the broker's fair-share queue with its default settings (half-life 1 day);
- `fifo`: the same broker queue in arrival order (`EDIF_BROKER_FAIR_SHARE_ORDER=arrival`):
  the same slots and dispatch, usage ignored;
- `off`: fair share disabled (`EDIF_BROKER_FAIR_SHARE_ENABLED=false`): jobs go straight to the
  sites' own FIFO queues. A site refuses more than `max_queue_per_model` (64) waiting jobs per
  model, so only loads the sites can hold work in this mode.

The broker's default quota policy is widened for the run (`EDIF_BROKER_QUOTA_DEFAULTS`: 1000
concurrent jobs per user, burst 1000) so that quotas refuse nothing.

Figures, per mode and scenario:

- light users: per light user, the time from their first submission to their last result
  (p50 and max over users); per light job, submission to result (p50, p95); and the heavy
  user's backlog drain time (first submission to last result) for comparison.
- contended window: from the moment every user has submitted work (the last user's first
  submission) until the first user has no work left (the earliest "last result" of any user).
- GPU-seconds per user inside the window: each job's execution interval, [RUNNING seen,
  RUNNING seen + execution_s] (execution_s is the site's measurement, from the result's meta),
  clipped to the window.
- Jain's fairness index of those shares, J = (sum x)^2 / (n * sum x^2): 1 when every user got
  the same, 1/n when one user got everything. Target >= 0.95 (issue 4). Also J over the shares
  from the first submission to the window's end (what a usage-history policy evens out) and
  over all jobs.

Prints a summary per mode and scenario; `--out` writes them with the per-job timelines as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio._backends._asyncio  # noqa: F401, I001 - before nnsight (spec §11.4)
import httpx
from nnsight import CONFIG
from nnsight.intervention.backends.remote import AsyncRemoteBackend
from nnsight.schema.request import RequestModel

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/fairness.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(REPO))

from auth.keys import KeyStore  # noqa: E402
from auth.roles import Role  # noqa: E402
from auth.tokens import TokenIssuer  # noqa: E402
from edif.demo import TINY_GPT2, load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import failover  # noqa: E402 - bench/failover.py: the same demo-mesh start

PROMPT = "The capital of France is"
MODES: dict[str, dict[str, str]] = {
    "fair": {},
    "fifo": {"EDIF_BROKER_FAIR_SHARE_ORDER": "arrival"},
    "off": {"EDIF_BROKER_FAIR_SHARE_ENABLED": "false"},
}
QUOTAS = json.dumps({"max_concurrent": 1000, "burst": 1000, "rate_per_s": 1000})


@dataclass
class JobRecord:
    user: str
    submitted: float
    running: float | None = None
    completed: float | None = None
    execution_s: float = 0.0
    site: str | None = None
    error: str | None = None
    updates: list[tuple[float, str, str]] = field(default_factory=list)

    @property
    def interval(self) -> tuple[float, float] | None:
        """When the job ran (monotonic, this process's clock)."""
        if self.completed is None:
            return None
        start = self.running if self.running is not None else self.completed - self.execution_s
        return (start, start + self.execution_s)


# -- the mesh --------------------------------------------------------------------------------


def start_mesh(home: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    """The demo mesh with quotas widened (nothing here may be refused) and the mode's settings."""
    return failover.start_mesh(home, {"EDIF_BROKER_QUOTA_DEFAULTS": QUOTAS, **extra_env})


def wait_running(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    deployments: dict = {}
    while time.monotonic() < deadline:
        try:
            deployments = httpx.get(f"{url}/status", timeout=5).json().get("deployments", {})
        except httpx.HTTPError:
            deployments = {}
        states = [d["application_state"] for d in deployments.values()]
        if len(states) >= 4 and all(s == "RUNNING" for s in states):
            return
        time.sleep(0.5)
    raise RuntimeError(f"models not RUNNING: {deployments}")


def stop_mesh(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the client side ---------------------------------------------------------------------------


class DeferredBackend(AsyncRemoteBackend):
    """The real client's `AsyncRemoteBackend.__call__`, split in two so that every job can be
    serialized first and then all of them sent at once: `__call__` (at the end of the trace)
    only serializes; `fire` subscribes and POSTs, as `__call__` would have."""

    blob: bytes = b""

    def __call__(self, tracer=None) -> DeferredBackend:
        self.meta = None
        self.blob = self._serialize(tracer)
        return self

    def fire(self) -> None:
        import websocket

        self.connection = websocket.create_connection(
            f"{self.ws_host}/subscribe",
            header={"ndif-api-key": self.api_key} if self.api_key else None,
        )
        request = RequestModel(model_key=self.model_key, compress=self.compress, env=self.env)
        request.session_id = json.loads(self.connection.recv())["session_id"]
        self.send(request, self.blob)


def prepare(model, url: str, token: str, spin: int) -> DeferredBackend:
    """One job through the real client's trace: captured and serialized, not yet sent."""
    backend = DeferredBackend(
        model.to_model_key(), host=url, api_key=token, env=model._remoteable_get_env()
    )
    with model.trace(PROMPT, backend=backend):
        n = 0
        while n < spin:
            n += 1
        logits = model.lm_head.output.save()  # noqa: F841
    return backend


def follow(backend: AsyncRemoteBackend, record: JobRecord) -> None:
    """Read the job's websocket to the end, timestamping every status as it arrives."""
    try:
        while True:
            message = backend.connection.recv()
            at = time.monotonic()
            response = backend.parse(message)
            status = response.status.value
            record.updates.append((at, status, response.description or ""))
            if status == "RUNNING" and record.running is None:
                record.running = at
            elif status == "COMPLETED":
                meta = response.meta or {}
                record.execution_s = float(meta.get("execution_s", 0.0))
                record.site = meta.get("site")
                if backend.download_result(response.data) is None:
                    record.error = "no result"
                record.completed = at
                return
            elif status == "ERROR":
                record.error = response.description
                return
    except Exception as error:  # noqa: BLE001 - reported with the figures
        record.error = f"{type(error).__name__}: {error}"
    finally:
        backend.close()


def submission_order(scenario: str, args: argparse.Namespace) -> list[str]:
    """Whose job is sent n-th: `together` round robin over the users while each has jobs left
    (everyone submits at the same moment), `backlog` the heavy user's jobs first."""
    light = [f"light-{i + 1}" for i in range(args.light_users)]
    if scenario == "backlog":
        return ["heavy"] * args.heavy_jobs + [u for _ in range(args.light_jobs) for u in light]
    left = {"heavy": args.heavy_jobs, **dict.fromkeys(light, args.light_jobs)}
    order: list[str] = []
    while any(left.values()):
        for user in left:
            if left[user]:
                order.append(user)
                left[user] -= 1
    return order


def run_load(url: str, home: Path, scenario: str, args: argparse.Namespace) -> list[JobRecord]:
    issuer = TokenIssuer(KeyStore(home / "keys"))
    order = submission_order(scenario, args)
    tokens = {  # fresh users per scenario: the previous scenario's usage does not count
        u: issuer.issue(f"{scenario}-{u}@bench.example.eu", Role.RESEARCHER, 7200)
        for u in set(order)
    }
    model = load(args.model, home=home)
    prepared = [(user, prepare(model, url, tokens[user], args.spin)) for user in order]
    records = [JobRecord(user, 0.0) for user in order]
    lock = threading.Lock()
    queue = iter(range(len(prepared)))

    def sender() -> None:  # several in parallel: the client's POST is mostly waiting
        while True:
            with lock:
                index = next(queue, None)
                if index is None:
                    return
                records[index].submitted = time.monotonic()
            backend = prepared[index][1]
            try:
                backend.fire()
            except Exception as error:  # noqa: BLE001 - reported with the figures
                records[index].error = f"{type(error).__name__}: {error}"
                return
            readers.submit(follow, backend, records[index])

    with ThreadPoolExecutor(max_workers=len(order)) as readers:
        senders = [threading.Thread(target=sender) for _ in range(args.senders)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
    return records


# -- figures ---------------------------------------------------------------------------------


def jain(shares: list[float]) -> float:
    """Jain's fairness index: 1 for equal shares, 1/n when one of n takes everything."""
    total = sum(shares)
    squares = sum(x * x for x in shares)
    return total * total / (len(shares) * squares) if squares else 1.0


def overlap(interval: tuple[float, float], window: tuple[float, float]) -> float:
    return max(0.0, min(interval[1], window[1]) - max(interval[0], window[0]))


def summarize(records: list[JobRecord]) -> dict[str, Any]:
    t0 = min(r.submitted for r in records)
    users = sorted({r.user for r in records}, key=lambda u: (u != "heavy", u))
    mine = {u: [r for r in records if r.user == u] for u in users}
    failed = [r for r in records if r.completed is None or r.error]
    first_submit = {u: min(r.submitted for r in rs) for u, rs in mine.items()}
    last_done = {u: max((r.completed or float("inf")) for r in rs) for u, rs in mine.items()}
    window = (max(first_submit.values()), min(last_done.values()))
    gpu = {
        u: sum(overlap(r.interval, window) for r in rs if r.interval is not None)
        for u, rs in mine.items()
    }
    since_start = {
        u: sum(overlap(r.interval, (t0, window[1])) for r in rs if r.interval is not None)
        for u, rs in mine.items()
    }
    light_users = [u for u in users if u != "heavy"]
    light_span = [last_done[u] - first_submit[u] for u in light_users]
    light_jobs = [r.completed - r.submitted for r in records if r.user != "heavy" and r.completed]
    quantiles = statistics.quantiles(light_jobs, n=20) if len(light_jobs) >= 2 else [0.0] * 19
    return {
        "jobs": len(records),
        "failed": len(failed),
        "failures": sorted({r.error or "no result" for r in failed})[:5],
        "submit_window_s": round(max(r.submitted for r in records) - t0, 3),
        "total_s": round(max(last_done.values()) - t0, 3),
        "execution_s_p50": round(statistics.median(r.execution_s for r in records), 4),
        # Site-measured execution over (sites x makespan): how busy the workers were kept.
        "worker_busy_fraction": round(
            sum(r.execution_s for r in records)
            / (len({r.site for r in records if r.site}) or 1)
            / (max(last_done.values()) - t0),
            3,
        ),
        "sites": {
            s: sum(r.site == s for r in records) for s in sorted({r.site or "-" for r in records})
        },
        "heavy_drain_s": round(last_done["heavy"] - first_submit["heavy"], 3),
        "light_user_completion_s_p50": round(statistics.median(light_span), 3),
        "light_user_completion_s_max": round(max(light_span), 3),
        "light_job_latency_s_p50": round(statistics.median(light_jobs), 3) if light_jobs else None,
        "light_job_latency_s_p95": round(quantiles[18], 3),
        "window_s": [round(window[0] - t0, 3), round(window[1] - t0, 3)],
        "window_gpu_s": {u: round(v, 3) for u, v in gpu.items()},
        "window_jobs_started": {
            u: sum(1 for r in rs if r.interval and window[0] <= r.interval[0] < window[1])
            for u, rs in mine.items()
        },
        "jain_index": round(jain(list(gpu.values())), 4),
        # Shares from the very start to the window's end: history a usage-based policy repays.
        "jain_index_start_to_window_end": round(jain(list(since_start.values())), 4),
        "jain_index_all_time": round(
            jain([sum(r.execution_s for r in rs) for rs in mine.values()]), 4
        ),
    }


def run_mode(mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One mesh with the mode's broker settings; every scenario on it, one after the other."""
    home = Path(tempfile.mkdtemp(prefix=f"edif-fairness-{mode}-"))
    env = dict(MODES[mode])
    if mode == "fair" and args.half_life is not None:
        env["EDIF_BROKER_FAIR_SHARE_HALF_LIFE_S"] = str(args.half_life)
    proc, state = start_mesh(home, env)
    url = state["broker_url"]
    summaries = []
    try:
        wait_running(url)
        for scenario in args.scenarios.split(","):
            load_before = os.getloadavg()[0]
            records = run_load(url, home, scenario, args)
            summary = {
                "mode": mode,
                "scenario": scenario,
                "load_1min_before": round(load_before, 2),
                **summarize(records),
                "load_1min_after": round(os.getloadavg()[0], 2),
            }
            shown = {k: v for k, v in summary.items() if k != "timeline"}
            print(json.dumps(shown, indent=2), flush=True)
            if args.out:
                summary["timeline"] = [asdict(r) for r in records]
            summaries.append(summary)
        return summaries
    finally:
        stop_mesh(proc)
        if not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="fair,fifo")
    parser.add_argument("--scenarios", default="together,backlog")
    parser.add_argument("--heavy-jobs", type=int, default=100)
    parser.add_argument("--light-users", type=int, default=5)
    parser.add_argument("--light-jobs", type=int, default=5)
    parser.add_argument("--spin", type=int, default=500_000)
    parser.add_argument("--model", default=TINY_GPT2)
    parser.add_argument("--half-life", type=float, default=None, help="fair mode (seconds)")
    parser.add_argument("--senders", type=int, default=8, help="threads sending at once")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep-home", action="store_true")
    args = parser.parse_args()
    CONFIG.APP.REMOTE_LOGGING = False
    results = []
    for mode in args.modes.split(","):
        results.extend(run_mode(mode.strip(), args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
