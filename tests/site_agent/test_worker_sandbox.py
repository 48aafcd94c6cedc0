"""The worker's sandbox: per-job scratch under Landlock (layer 3), and the site's own policy.

The Landlock tests restrict a fresh thread (the restriction is per thread and irreversible).
The worker tests run real nnsight payloads through `ModelWorker` on the tiny demo model, under
a site policy of its own. Scratch: with the source check switched off (as if it had missed
`torch.save`, which the runtime guard does not cover) the writes reach the OS layer: outside
the job's scratch directory they are refused, inside it they work, and the next job finds
nothing of them. Policy: a refusal names the site's policy, and what it admits beyond the
default runs.
"""

# ruff: noqa: F841 - names bound in a trace block are read by the backend

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nnsight
import pytest
import torch
import zstandard
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

from edif.demo import TINY_GPT2, load, model_dir
from site_agent import containment, execution, scratch
from site_agent.config import ModelConfig
from site_agent.scratch import Scratch, on_thread, restrict_writes

LANDLOCK, WHY_NOT = scratch.probe()
needs_landlock = pytest.mark.skipif(not LANDLOCK, reason=f"no Landlock here: {WHY_NOT}")
PROMPT = "the capital of france is"


def write(path: str | Path) -> str:
    """'ok', or the error writing `path` raised."""
    try:
        Path(path).write_bytes(b"x")
    except OSError as exc:
        return type(exc).__name__
    return "ok"


def test_a_job_directory_starts_empty_and_everything_goes_after_it(tmp_path: Path) -> None:
    box = Scratch.create(str(tmp_path))
    first = box.begin()
    assert os.listdir(first) == []
    Path(first, "a").write_bytes(b"1")
    Path(box.root, "beside").write_bytes(b"2")  # beneath the root, outside the job's dir
    os.makedirs(Path(first, "d", "e"))
    assert box.end() == []
    assert os.listdir(box.root) == []
    second = box.begin()
    assert second != first and os.listdir(second) == []
    box.remove()
    assert not os.path.exists(box.root)


@needs_landlock
def test_a_restricted_thread_writes_only_beneath_its_root(tmp_path: Path) -> None:
    root, weights = tmp_path / "scratch", tmp_path / "weights"
    root.mkdir()
    weights.mkdir()

    def job() -> dict[str, str]:
        restrict_writes(str(root))
        return {
            "scratch": write(root / "out.bin"),
            "weights": write(weights / "model.safetensors"),
            "tmp": write(f"/tmp/edif-scratch-test-{os.getpid()}"),
            "mkdir_outside": _mkdir(tmp_path / "new"),
            "rename_out": _rename(root / "out.bin", tmp_path / "moved"),
            "dev_null": write("/dev/null"),
            "dev_shm": write(f"/dev/shm/edif-scratch-test-{os.getpid()}"),
            "proc_mem": _open_rw("/proc/self/mem"),
        }

    got = on_thread(job)
    assert got == {
        "scratch": "ok",
        "weights": "PermissionError",
        "tmp": "PermissionError",
        "mkdir_outside": "PermissionError",
        "rename_out": "PermissionError",
        "dev_null": "ok",
        "dev_shm": "PermissionError",
        "proc_mem": "PermissionError",
    }
    assert write(tmp_path / "main-thread") == "ok"  # the rest of the process is free


def _open_rw(path: str) -> str:
    try:
        with open(path, "r+b"):
            pass
    except OSError as exc:
        return type(exc).__name__
    return "ok"


def _mkdir(path: Path) -> str:
    try:
        path.mkdir()
    except OSError as exc:
        return type(exc).__name__
    return "ok"


def _rename(src: Path, dst: Path) -> str:
    try:
        src.rename(dst)
    except OSError as exc:
        return type(exc).__name__
    return "ok"


@needs_landlock
def test_seccomp_leaves_path_writes_to_landlock_only_where_it_is_on(tmp_path: Path) -> None:
    if not containment.probe().available:
        pytest.skip("no seccomp here")

    def job(landlock: bool) -> tuple[str, str]:
        if landlock:
            restrict_writes(str(tmp_path))
        containment.contain_thread(landlock=landlock)
        return write(tmp_path / f"f-{landlock}"), write("/tmp/edif-scratch-seccomp")

    assert on_thread(job, True) == ("ok", "PermissionError")
    assert on_thread(job, False) == ("PermissionError", "PermissionError")


# --- a real worker ---------------------------------------------------------------------------


class Capture(Backend):
    def __init__(self) -> None:
        self.blob = b""

    def __call__(self, tracer) -> None:
        nnsight.ndif.pull_env()
        self.blob = RequestModel.serialize(tracer, True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A ModelWorker on the tiny model (its job thread contained for good), and a meta model."""
    home = tmp_path_factory.mktemp("edif-home")
    meta = load(TINY_GPT2, home=home)
    worker = tiny_worker(model_dir(TINY_GPT2, home))
    yield worker, meta, model_dir(TINY_GPT2, home)
    worker._thread.shutdown()
    if worker.scratch is not None:
        worker.scratch.remove()


def tiny_worker(weights: Path):  # noqa: ANN201 - a site_agent.worker.ModelWorker
    from site_agent.worker import ModelWorker

    cfg = ModelConfig(
        repo_id=TINY_GPT2,
        source=str(weights),
        device_map="cpu",
        sandbox={
            # Where this machine has them, both are applied anyway (the tests that need
            # them are skipped elsewhere); without the opt-outs the worker would refuse.
            "require_seccomp": False,
            "require_landlock": False,
            "policy": {"name": "test-site", "version": 7, "allow_imports": ["statistics"]},
        },
    )
    return ModelWorker(cfg.model_dump_json(), 1 << 20)


@pytest.fixture
def no_static_check(monkeypatch):
    monkeypatch.setattr(execution, "check_source", lambda *a, **k: None)


def run_job(worker, blob: bytes) -> tuple:
    """The job's last update: ("done", meta) or ("error", kind, text[, replace])."""
    items = list(worker.execute(blob, True, json.dumps({})))
    return items[-1]


def save_job(meta, path: str) -> bytes:
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        torch.save(torch.zeros(1), path)
        x = meta.lm_head.output.save()
    return cap.blob


def load_job(meta, path: str) -> bytes:
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        got = torch.load(path)
        x = meta.lm_head.output.save()
    return cap.blob


@needs_landlock
def test_the_worker_confines_its_job_thread(site) -> None:
    worker, _, _ = site
    assert worker.contained == containment.probe().available
    assert worker.scratch is not None and worker.scratch.own_cwd
    assert os.listdir(worker.scratch.root) == []


@needs_landlock
def test_a_job_cannot_write_into_the_weights_or_tmp(site, no_static_check) -> None:
    worker, meta, weights = site
    size = (weights / "model.safetensors").stat().st_size
    for target in (f"{weights}/model.safetensors", "/tmp/edif-scratch-job.pt"):
        last = run_job(worker, save_job(meta, target))
        assert last[:2] == ("error", "USER") and "Permission denied" in last[2], last
        assert len(last) == 3  # a refused write leaves nothing to replace the worker for
    assert not os.path.exists("/tmp/edif-scratch-job.pt")
    assert (weights / "model.safetensors").stat().st_size == size  # not even truncated


@needs_landlock
def test_a_job_writes_in_its_scratch_and_the_next_job_sees_nothing(site, no_static_check) -> None:
    worker, meta, _ = site
    assert run_job(worker, save_job(meta, "kept.pt"))[0] == "done"  # its working directory
    assert os.listdir(worker.scratch.root) == []  # removed after the job
    last = run_job(worker, load_job(meta, "kept.pt"))
    assert last[:2] == ("error", "USER") and "FileNotFoundError" in last[2], last
    assert run_job(worker, load_job(meta, "../job-0/kept.pt"))[0] == "error"


def test_a_refusal_names_the_site_policy(site) -> None:
    worker, meta, _ = site
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        import subprocess  # noqa: F401 - refused on the site

        x = meta.lm_head.output.save()
    last = run_job(worker, cap.blob)
    assert last[:2] == ("error", "REFUSED") and "site policy test-site v7" in last[2], last
    garbage = zstandard.ZstdCompressor().compress(pickle.dumps(os.system, protocol=4))
    last = run_job(worker, garbage)  # refused by the unpickler, whose message had no policy
    assert last[:2] == ("error", "REFUSED") and "global posix.system" in last[2], last
    assert last[2].endswith("(site policy test-site v7)")


def test_what_the_site_policy_adds_runs(site) -> None:
    worker, meta, _ = site
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        import statistics

        m = statistics.mean([1, 2, 3])
        x = meta.lm_head.output.save()
    assert run_job(worker, cap.blob)[0] == "done"


def result_of(worker, blob: bytes) -> dict:
    """Run a job on the worker and load its result as the client does."""
    items = list(worker.execute(blob, True, json.dumps({})))
    assert items[-1][0] == "done", items[-1]
    chunks = [item[1] for item in items if item[0] == "chunk"] + list(items[-1][2:])
    data = b"".join(chunks)
    return torch.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)), weights_only=False)


def test_an_uncompressed_result_streams_in_chunks_as_it_is_encoded(site) -> None:
    """Uncompressed results are cut while torch.save writes them (chunking.py): the chunks
    add up to exactly what the client loads, "done" names their size and sha256."""
    worker, meta, weights = site
    real = load(TINY_GPT2, home=weights.parents[2], dispatch=True)
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        hidden = meta.transformer.h[0].output.save()
        logits = meta.lm_head.output.save()
        ones = torch.ones(3 * 2**18 + 5).save()  # 3 MiB and a bit: four 1 MiB chunks
    blob = zstandard.ZstdDecompressor().decompress(cap.blob)  # as sent with COMPRESS off
    items = list(worker.execute(blob, False, json.dumps({})))
    chunks = [bytes(item[1]) for item in items if item[0] == "chunk"]
    assert items[-1][0] == "done", items[-1]
    data = b"".join(chunks)
    assert len(chunks) == 4 and all(len(c) == 1 << 20 for c in chunks[:-1])
    assert items[-1][1]["total_bytes"] == len(data)
    assert items[-1][1]["sha256"] == hashlib.sha256(data).hexdigest()
    remote = torch.load(io.BytesIO(data), weights_only=False)
    with real.trace(PROMPT):
        local_hidden = real.transformer.h[0].output.save()
        local_logits = real.lm_head.output.save()
    assert torch.equal(remote["hidden"], local_hidden)
    assert torch.equal(remote["logits"], local_logits)
    assert torch.equal(remote["ones"], torch.ones(3 * 2**18 + 5))


def test_a_job_that_changes_the_model_ends_in_error_after_its_streamed_chunks(site) -> None:
    """Chunks flow before the isolation check; the check still decides: "error", never
    "done", so the broker drops what arrived (and the worker asks to be replaced)."""
    _, meta, weights = site
    worker = tiny_worker(weights)  # this job taints its worker: not the shared one
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        meta.transformer.h[0].mlp.c_fc.weight.data[0, 0] = 1e9
        hidden = meta.transformer.h[0].output.save()
    blob = zstandard.ZstdDecompressor().decompress(cap.blob)
    items = list(worker.execute(blob, False, json.dumps({})))
    assert items[-1][0] == "error" and items[-1][-1] is True, items[-1]
    assert "changed state shared" in items[-1][2]
    assert not any(item[0] == "done" for item in items)
    worker._thread.shutdown()
    if worker.scratch is not None:
        worker.scratch.remove()


def test_interpretability_jobs_still_match_local_on_the_contained_worker(site) -> None:
    """Sessions, patching, generate, gradients and a shipped helper under every layer."""
    worker, meta, weights = site
    real = load(TINY_GPT2, home=weights.parents[2], dispatch=True)

    def centred(t):  # shipped by source, runs with the restricted builtins
        return t - t.mean(dim=-1, keepdim=True)

    def session(model, backend=None):
        with model.session(backend=backend):
            with model.trace(PROMPT):
                clean = model.transformer.h[0].output[:, -1, :].save()
            with model.trace("paris is in france"):
                model.transformer.h[0].output[:, -1, :] = clean
                patched = centred(model.lm_head.output).save()
        return {} if backend else {"clean": clean, "patched": patched}

    def generate(model, backend=None):
        with model.generate(PROMPT, max_new_tokens=3, do_sample=False, backend=backend) as tr:
            tokens = tr.result.save()
        return {} if backend else {"tokens": tokens}

    def gradients(model, backend=None):
        with model.trace(PROMPT, backend=backend):
            hidden = model.transformer.h[0].output.save()
            hidden.requires_grad_(True)
            logits = model.lm_head.output
            with logits.sum().backward():
                grad = hidden.grad.save()
        return {} if backend else {"grad": grad}

    for job in (session, generate, gradients):
        cap = Capture()
        job(meta, cap)
        remote, local = result_of(worker, cap.blob), job(real)
        for name, value in local.items():
            assert torch.equal(remote[name], value), (job.__name__, name)


def test_roots_of_ended_processes_are_removed_when_a_worker_starts(tmp_path: Path) -> None:
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = tmp_path / f"{scratch.ROOT_PREFIX}{ended.stdout.strip()}-abc"
    (dead / "job-0").mkdir(parents=True)
    (dead / "job-0" / "left.bin").write_bytes(b"x")
    alive = tmp_path / f"{scratch.ROOT_PREFIX}{os.getpid()}-def"
    other = tmp_path / "123-not-a-root"
    alive.mkdir()
    other.mkdir()
    box = Scratch.create(str(tmp_path))
    assert not dead.exists() and alive.exists() and other.exists()
    assert Path(box.root).name.startswith(f"{scratch.ROOT_PREFIX}{os.getpid()}-")


# --- the agent's calls: begin / more ---------------------------------------------------------


def calls(worker, blob: bytes, compress: bool) -> list[list[tuple]]:
    """A job driven as the agent drives it over Ray: `begin`, then `more` until its end."""
    batches = [worker.begin(blob, compress, json.dumps({}))]
    while not any(item[0] in ("done", "error") for item in batches[-1]):
        batches.append(worker.more())
    return batches


def test_a_small_job_comes_back_whole_from_one_call(site) -> None:
    worker, meta, _ = site
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        logits = meta.lm_head.output.save()
    (batch,) = calls(worker, cap.blob, True)
    assert [item[0] for item in batch] == ["running", "done"]
    assert len(batch[-1]) == 3  # the buffered result rides on "done"
    assert worker.more() == [("error", "INTERNAL", "no job is running on this model worker")]


def test_the_calls_deliver_what_the_generator_does(site) -> None:
    """Uncompressed, several chunks: each full chunk travels at once, the short last one with
    the end; the bytes are the generator's, and a printed line comes before the result."""
    worker, meta, _ = site
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        print("hello from the block")
        ones = torch.ones(3 * 2**18 + 5).save()  # four 1 MiB chunks, the last short
    blob = zstandard.ZstdDecompressor().decompress(cap.blob)
    batches = calls(worker, blob, False)
    items = [item for batch in batches for item in batch]
    assert len(batches) > 1  # the full chunks did not wait for the end
    tags = [item[0] for item in items]
    assert tags[0] == "running" and tags[-1] == "done"
    assert tags.index("log") < tags.index("chunk")
    got = b"".join(bytes(item[1]) for item in items if item[0] == "chunk")
    reference = list(worker.execute(blob, False, json.dumps({})))
    assert got == b"".join(bytes(item[1]) for item in reference if item[0] == "chunk")
    assert items[-1][1]["sha256"] == hashlib.sha256(got).hexdigest()


def test_a_short_result_does_not_travel_before_its_end(site) -> None:
    """Uncompressed and under one chunk: the only chunk is the last, so it waits for "done"
    (the isolation check) and the job still takes one call."""
    worker, meta, _ = site
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        logits = meta.lm_head.output.save()
    blob = zstandard.ZstdDecompressor().decompress(cap.blob)
    (batch,) = calls(worker, blob, False)
    assert [item[0] for item in batch] == ["running", "chunk", "done"]


def test_an_abandoned_job_does_not_hold_up_the_next(site) -> None:
    """The agent stopped reading mid-result (the broker went away): the next `begin` frees the
    job thread, and the next job's updates are its own."""
    worker, meta, _ = site
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        big = torch.ones(16 * 2**18).save()  # 16 chunks: more than may wait unshipped
    blob = zstandard.ZstdDecompressor().decompress(cap.blob)
    first = worker.begin(blob, False, json.dumps({}))
    assert [item[0] for item in first][-1] == "chunk"
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        logits = meta.lm_head.output.save()
    (batch,) = calls(worker, cap.blob, True)
    assert [item[0] for item in batch] == ["running", "done"], batch
    assert torch.equal(_load(batch)["logits"], result_of(worker, cap.blob)["logits"])


def _load(batch: list[tuple]) -> dict:
    data = zstandard.ZstdDecompressor().decompress(bytes(batch[-1][2]))
    return torch.load(io.BytesIO(data), weights_only=False)
