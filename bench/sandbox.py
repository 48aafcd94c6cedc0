"""Per-job cost of the site sandbox on the demo model (tiny-gpt2, CPU).

Measures, on one job thread contained like a worker's (Landlock scratch root, then the
seccomp filter), each piece of sandbox work a job pays for, and their sum per job:
- layer 1: the block's source check (a cached verdict, as for a resent job; the uncached
  check is shown beside it), the checks of its shipped namespaces, and the payload scan
  `release()` does before shipped code may run (where modules sit in the payload);
- layer 2: the restricted builtins the block runs with;
- layer 3: the job's fresh scratch directory, made before and emptied after it (the
  Landlock and seccomp restrictions themselves are loaded once per worker: shown once);
- layer 4: the isolation fingerprint after the job and its comparison with the baseline.
A whole `run_request` (deserialize, run, encode), with and without layer 3/4 work around
it, is shown for scale. Run: `.venv/bin/python bench/sandbox.py [--n 500] [--scratch-dir D]`
(D: where the scratch root goes, as the site's `sandbox.scratch_dir`; default: the temp dir).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nnsight
import torch
import zstandard
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

from edif.demo import TINY_GPT2, load
from site_agent import source_policy
from site_agent.containment import contain_thread
from site_agent.execution import run_request
from site_agent.isolation import differences, fingerprint
from site_agent.runtime_guard import builtins_dict
from site_agent.scratch import Scratch, own_working_directory, restrict_writes
from site_agent.source_policy import check_namespace, check_source, module_bindings
from site_agent.unpickler import AllowlistUnpickler, PayloadPolicy


class Capture(Backend):
    def __call__(self, tracer) -> None:
        nnsight.ndif.pull_env()
        self.blob = RequestModel.serialize(tracer, True)


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def ms(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--scratch-dir", default=None, help="parent of the scratch root")
    args = parser.parse_args()
    n = args.n
    torch.set_num_threads(1)
    home = Path(tempfile.mkdtemp())
    meta, real = load(TINY_GPT2, home=home), load(TINY_GPT2, home=home, dispatch=True)
    cap = Capture()
    with meta.trace("The capital of France is", backend=cap):
        logits = meta.lm_head.output.save()  # noqa: F841
    policy = PayloadPolicy()
    blob = zstandard.ZstdDecompressor().decompress(cap.blob)
    persistent = real._remoteable_persistent_objects()

    job = ThreadPoolExecutor(max_workers=1)
    scratch = Scratch.create(args.scratch_dir)
    print(f"scratch root: {scratch.root}")

    def contain() -> tuple[float, float]:
        t = time.perf_counter()
        restrict_writes(scratch.root)
        scratch.own_cwd = own_working_directory()
        landlock = (time.perf_counter() - t) * 1000
        return landlock, ms(lambda: contain_thread(landlock=True))

    landlock_ms, seccomp_ms = job.submit(contain).result()
    print(f"Landlock restriction (once per worker): {landlock_ms:.2f} ms")
    print(f"seccomp filter load (once per worker):  {seccomp_ms:.2f} ms")
    base = job.submit(fingerprint, real, True).result()

    def unpickled() -> tuple[AllowlistUnpickler, object, str, str, dict, dict]:
        unpickler = AllowlistUnpickler(io.BytesIO(blob), persistent, policy=policy)
        loaded = unpickler.load()
        tracer, (source, glbls, variables) = loaded
        filename = tracer.info.frame.f_code.co_filename
        return unpickler, loaded, source, filename, glbls, variables

    def one_job() -> dict[str, float]:
        unpickler, loaded, source, filename, glbls, variables = unpickled()  # not timed
        bindings = module_bindings(glbls, variables)
        row = {
            "scratch directory made (layer 3)": ms(scratch.begin),
            "namespace checks (layer 1)": ms(
                lambda: (
                    check_namespace(glbls, "globals", policy.source),
                    check_namespace(variables, "locals", policy.source),
                )
            ),
            "source check, cached verdict (layer 1)": ms(
                lambda: check_source(source, filename, policy.source, bindings)
            ),
            "payload module scan (layer 1)": ms(
                lambda: unpickler.release(loaded, [glbls, variables])
            ),
            "restricted builtins (layer 2)": ms(lambda: builtins_dict(policy.source)),
            "isolation fingerprint + compare (layer 4)": ms(
                lambda: differences(base, fingerprint(real))
            ),
            "scratch directory emptied (layer 3)": ms(scratch.end),
        }
        row["= sandbox work per job"] = sum(row.values())
        return row

    def uncached() -> float:
        _, _, source, filename, glbls, variables = unpickled()
        bindings = module_bindings(glbls, variables)
        return ms(lambda: source_policy._check_source(source, filename, policy.source, bindings, 1))

    rows: dict[str, list[float]] = {}
    for _ in range(n):
        for name, value in job.submit(one_job).result().items():
            rows.setdefault(name, []).append(value)
    rows["(source check, uncached)"] = [job.submit(uncached).result() for _ in range(n)]

    def run_job() -> None:
        run_request(real, cap.blob, True, {}, lambda _: None, policy)

    def run_contained_job() -> None:
        scratch.begin()
        run_job()
        differences(base, fingerprint(real))
        scratch.end()

    rows["run_request (layers 1-2 inside)"] = job.submit(timed, run_job, n).result()
    rows["run_request + layers 3-4 per job"] = job.submit(timed, run_contained_job, n).result()
    for name, samples in rows.items():
        p50, p95 = percentiles(samples)
        print(f"{name:44s} p50 {p50:7.3f} ms   p95 {p95:7.3f} ms")
    scratch.remove()


if __name__ == "__main__":
    main()
