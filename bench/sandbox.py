"""Per-job cost of the site sandbox on the demo model (tiny-gpt2, CPU).

Measures, on one contained job thread like a worker's: the restricted builtins (layer 2,
per job), the isolation fingerprint + comparison (layer 4, per job), a whole `run_request`
with and without those, and the one-time cost of loading the seccomp filter (layer 3, once
per worker). Run: `.venv/bin/python bench/sandbox.py [--n 300]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nnsight
import torch
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

from edif.demo import TINY_GPT2, load
from site_agent.containment import contain_thread
from site_agent.execution import run_request
from site_agent.isolation import differences, fingerprint
from site_agent.runtime_guard import builtins_dict
from site_agent.source_policy import SourcePolicy


class Capture(Backend):
    def __call__(self, tracer) -> None:
        nnsight.ndif.pull_env()
        self.blob = RequestModel.serialize(tracer, True)


def timed(fn, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    n = parser.parse_args().n
    torch.set_num_threads(1)
    home = Path(tempfile.mkdtemp())
    meta, real = load(TINY_GPT2, home=home), load(TINY_GPT2, home=home, dispatch=True)
    cap = Capture()
    with meta.trace("The capital of France is", backend=cap):
        logits = meta.lm_head.output.save()  # noqa: F841
    job = ThreadPoolExecutor(max_workers=1)
    t = time.perf_counter()
    job.submit(contain_thread).result()
    print(f"seccomp filter load (once per worker): {(time.perf_counter() - t) * 1000:.2f} ms")
    base = job.submit(fingerprint, real).result()
    policy = SourcePolicy()

    def run_job() -> None:
        run_request(real, cap.blob, True, {}, lambda _: None)

    rows = {
        "restricted builtins (layer 2)": lambda: builtins_dict(policy),
        "isolation fingerprint (layer 4)": lambda: fingerprint(real),
        "isolation compare (layer 4)": lambda: differences(base, fingerprint(real)),
        "run_request (layers 1-3 incl.)": run_job,
        "run_request + isolation check": lambda: (run_job(), differences(base, fingerprint(real))),
    }
    for name, fn in rows.items():
        p50, p95 = job.submit(timed, fn, n).result()
        print(f"{name:34s} p50 {p50:7.3f} ms   p95 {p95:7.3f} ms")


if __name__ == "__main__":
    main()
