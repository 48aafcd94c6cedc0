"""run_request on real client payloads, compared with the same block run locally.

Payloads are produced in-process by the unmodified nnsight client: a capturing backend does
what `RemoteBackend` does before it sends (`pull_env`, `RequestModel.serialize`) and keeps
the bytes. The "site" is a dispatched copy of the same demo model in this process.
"""

# Names bound in a trace block are read by the backend (and pushed to the caller), not by
# the Python code after it, so "assigned but never used" is the normal shape of a block.
# ruff: noqa: F841

from __future__ import annotations

import contextlib
import dataclasses
import io
import linecache
import os
import pickle
import sys
import types
from collections.abc import Callable, Iterator

import nnsight
import numpy as np
import pytest
import torch
import zstandard
from nnsight.intervention import serialization
from nnsight.intervention.serialization import dumps, reduce_block
from nnsight.schema.request import RequestModel
from nnsight.tracing import globals as tracing_globals
from nnsight.tracing import tracer as tracer_module
from nnsight.tracing.backend import Backend

from edif.demo import TINY_GPT2, TINY_LLAMA, load
from edif.errors import (
    EnvNotAllowed,
    GlobalNotAllowed,
    ModelMismatch,
    PayloadRefused,
    PayloadUnreadable,
    ResultNotSerializable,
    SourceRefused,
    UserCodeError,
)
from site_agent.execution import ExecutionResult, run_request
from site_agent.logrelay import LogRelay
from site_agent.source_policy import SourcePolicy
from site_agent.unpickler import PayloadPolicy

PROMPT = "the capital of france is"  # 7 tokens with the demo tokenizer


class Capture(Backend):
    """Stands in for RemoteBackend: serializes the trace as it would, and keeps the bytes."""

    def __init__(self, model, compress: bool = True) -> None:
        self.compress = compress
        self.env = model._remoteable_get_env()
        self.blob = b""

    def __call__(self, tracer) -> None:
        nnsight.ndif.pull_env()
        self.blob = RequestModel.serialize(tracer, self.compress)


class Site:
    """A demo model as the researcher holds it (meta) and as the site runs it (dispatched)."""

    def __init__(self, repo_id: str, home) -> None:
        self.meta = load(repo_id, home=home)
        self.real = load(repo_id, dispatch=True, home=home)
        self.logs: list[str] = []

    def capture(self, compress: bool = True) -> Capture:
        return Capture(self.meta, compress)

    def run(self, cap: Capture, env: dict | None = None) -> ExecutionResult:
        env = cap.env if env is None else env
        return run_request(self.real, cap.blob, cap.compress, env, self.logs.append)

    def run_and_load(self, cap: Capture) -> dict:
        out = self.run(cap)
        return client_load(out.result_bytes, cap.compress)


def client_load(data: bytes, compress: bool) -> dict:
    if compress:
        data = zstandard.ZstdDecompressor().decompress(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


@pytest.fixture(scope="session")
def edif_home(tmp_path_factory):
    return tmp_path_factory.mktemp("edif-home")


@pytest.fixture(scope="session")
def gpt2(edif_home) -> Site:
    return Site(TINY_GPT2, edif_home)


@pytest.fixture(scope="session")
def llama(edif_home) -> Site:
    return Site(TINY_LLAMA, edif_home)


def layers(model):
    return model.transformer.h if hasattr(model._module, "transformer") else model.model.layers


# --- results match a local run ---------------------------------------------------------


@pytest.mark.parametrize("site_name", ["gpt2", "llama"])
def test_hidden_states_and_logits_match_local(request, site_name: str) -> None:
    site: Site = request.getfixturevalue(site_name)
    meta, real = site.meta, site.real
    cap = site.capture()
    layer = layers(meta)[0]
    with meta.trace(PROMPT, backend=cap):
        hidden = layer.output.save()
        last = layer.output[:, -1, :].save()
        logits = meta.lm_head.output.save()
    out = site.run(cap)
    remote = client_load(out.result_bytes, compress=True)

    layer = layers(real)[0]
    with real.trace(PROMPT):
        hidden = layer.output.save()
        last = layer.output[:, -1, :].save()
        logits = real.lm_head.output.save()
    assert out.saved_names == ["hidden", "last", "logits"] == sorted(remote)
    assert torch.equal(remote["hidden"], hidden) and hidden.shape == (1, 7, 64)
    assert torch.equal(remote["last"], last) and torch.equal(remote["logits"], logits)
    assert out.execution_s > 0
    assert out.peak_memory_bytes >= 0 if torch.cuda.is_available() else out.peak_memory_bytes == 0


def test_setting_a_layer_output(gpt2: Site) -> None:
    meta, real = gpt2.meta, gpt2.real
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        meta.transformer.h[0].output[:, -1, :] = 0
        meta.transformer.h[1].output = meta.transformer.h[1].output * 2
        logits = meta.lm_head.output.save()
    remote = gpt2.run_and_load(cap)
    with real.trace(PROMPT):
        real.transformer.h[0].output[:, -1, :] = 0
        real.transformer.h[1].output = real.transformer.h[1].output * 2
        logits = real.lm_head.output.save()
    with real.trace(PROMPT):
        clean = real.lm_head.output.save()
    assert torch.equal(remote["logits"], logits) and not torch.equal(logits, clean)


def test_patching_with_a_shipped_tensor(gpt2: Site) -> None:
    meta, real = gpt2.meta, gpt2.real
    patch = torch.randn(64, generator=torch.Generator().manual_seed(7))
    cap = gpt2.capture(compress=False)
    with meta.trace(PROMPT, backend=cap):
        meta.transformer.h[1].output[:, -1, :] = patch
        logits = meta.lm_head.output.save()
    remote = gpt2.run_and_load(cap)
    with real.trace(PROMPT):
        real.transformer.h[1].output[:, -1, :] = patch
        logits = real.lm_head.output.save()
    assert torch.equal(remote["logits"], logits)


def test_a_batch_of_invokes(gpt2: Site) -> None:
    meta, real = gpt2.meta, gpt2.real
    cap = gpt2.capture()
    with meta.trace(backend=cap) as tracer:
        with tracer.invoke(PROMPT):
            first = meta.transformer.h[1].output[:, -1, :].save()
        with tracer.invoke("paris is in france"):
            second = meta.lm_head.output.save()
    remote = gpt2.run_and_load(cap)
    with real.trace() as tracer:
        with tracer.invoke(PROMPT):
            first = real.transformer.h[1].output[:, -1, :].save()
        with tracer.invoke("paris is in france"):
            second = real.lm_head.output.save()
    assert torch.equal(remote["first"], first) and torch.equal(remote["second"], second)


def test_session_with_two_traces(gpt2: Site) -> None:
    meta, real = gpt2.meta, gpt2.real
    cap = gpt2.capture()
    with meta.session(backend=cap):
        with meta.trace(PROMPT):
            clean = meta.transformer.h[0].output[:, -1, :].save()
        with meta.trace("paris is in france"):
            meta.transformer.h[0].output[:, -1, :] = clean
            patched = meta.lm_head.output.save()
    remote = gpt2.run_and_load(cap)
    with real.session():
        with real.trace(PROMPT):
            clean = real.transformer.h[0].output[:, -1, :].save()
        with real.trace("paris is in france"):
            real.transformer.h[0].output[:, -1, :] = clean
            patched = real.lm_head.output.save()
    assert sorted(remote) == ["clean", "patched"]
    assert torch.equal(remote["clean"], clean) and torch.equal(remote["patched"], patched)


def test_generate(gpt2: Site) -> None:
    meta, real = gpt2.meta, gpt2.real
    cap = gpt2.capture()
    with meta.generate(PROMPT, max_new_tokens=3, do_sample=False, backend=cap) as tracer:
        first_logits = meta.lm_head.output.save()
        tokens = tracer.result.save()
    remote = gpt2.run_and_load(cap)
    with real.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
        first_logits = real.lm_head.output.save()
        tokens = tracer.result.save()
    assert tokens.shape == (1, 10)
    assert torch.equal(remote["tokens"], tokens)
    assert torch.equal(remote["first_logits"], first_logits)


def test_view_compaction_in_a_real_result(gpt2: Site) -> None:
    meta = gpt2.meta
    cap = gpt2.capture(compress=False)
    with meta.trace(PROMPT, backend=cap):
        last = meta.transformer.h[0].output[:, -1, :].save()
    out = gpt2.run(cap)
    last = client_load(out.result_bytes, compress=False)["last"]
    assert last.shape == (1, 64) and last.untyped_storage().nbytes() == 64 * 4
    whole = io.BytesIO()
    torch.save({"last": torch.zeros(1, 7, 64)}, whole)
    assert len(out.result_bytes) < len(whole.getvalue()) - 1000


# --- logs ------------------------------------------------------------------------------


def test_prints_are_relayed_line_by_line(gpt2: Site) -> None:
    meta = gpt2.meta
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        hidden = meta.transformer.h[0].output
        print("first")
        print("shape", tuple(hidden.shape))
        print("two\nlines")
        print("tail", end="")
    stdout = sys.stdout
    gpt2.logs.clear()
    out = gpt2.run(cap)
    assert gpt2.logs == ["first", "shape (1, 7, 64)", "two", "lines", "tail"]
    assert out.saved_names == [] and sys.stdout is stdout


def test_log_relay_emits_completed_lines_and_the_tail() -> None:
    lines: list[str] = []
    with LogRelay(lines.append) as relay:
        print("a", end="")
        print("b")
        assert lines == ["ab"]
        relay.write("c\n\nd")
    assert lines == ["ab", "c", "", "d"]


def test_log_relay_passes_other_threads_through(capsys) -> None:
    import threading

    lines: list[str] = []
    with LogRelay(lines.append):
        worker = threading.Thread(target=print, args=("from another thread",))
        worker.start()
        worker.join()
        print("mine")
    assert lines == ["mine"]
    assert "from another thread" in capsys.readouterr().out


# --- failures leave the worker reusable ------------------------------------------------


def assert_still_works(site: Site) -> None:
    """The worker is as good as new: nnsight's per-thread state is reset, the next run matches."""
    meta, real = site.meta, site.real
    assert getattr(tracer_module._local, "depth", 0) == 0 and not tracer_module._saves()
    assert real.interleaver.mediators == []
    cap = site.capture()
    with meta.trace(PROMPT, backend=cap):
        logits = meta.lm_head.output.save()
    remote = site.run_and_load(cap)
    with real.trace(PROMPT):
        logits = real.lm_head.output.save()
    assert torch.equal(remote["logits"], logits)


def test_an_exception_in_the_block_is_a_user_code_error(gpt2: Site) -> None:
    meta = gpt2.meta
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        hidden = meta.transformer.h[0].output.save()
        print("before the error")
        raise ValueError(f"boom {41 + 1}")
    with pytest.raises(UserCodeError) as caught:
        gpt2.run(cap)
    message = caught.value.message
    assert message.startswith("Traceback (most recent call last):")
    assert message.endswith("ValueError: boom 42")
    # The block travels as ast.unparse'd source, so the line shows in its normalized form.
    assert __file__ in message and "raise ValueError(f'boom {41 + 1}')" in message
    assert "site-packages" not in message and "site_agent/execution.py" not in message
    assert message.count("File ") == 1  # only the user's own frame
    assert_still_works(gpt2)


def test_a_shipped_functions_frame_is_shown(gpt2: Site) -> None:
    meta = gpt2.meta

    def explode(value):
        raise RuntimeError(f"inner {value}")

    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        explode(meta.transformer.h[0].output.shape[1])
    with pytest.raises(UserCodeError) as caught:
        gpt2.run(cap)
    message = caught.value.message
    assert message.count("File ") == 2 and "[explode:" in message
    assert 'raise RuntimeError(f"inner {value}")' in message  # its source, line for line
    assert message.endswith("RuntimeError: inner 7")
    assert_still_works(gpt2)


def test_a_missing_module_reads_as_on_the_client(gpt2: Site) -> None:
    meta = gpt2.meta
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        hidden = meta.transformer.h[7].output.save()
    with pytest.raises(UserCodeError, match="has attribute '7'$"):
        gpt2.run(cap)
    assert_still_works(gpt2)


def test_exit_in_the_block_does_not_end_the_worker(gpt2: Site) -> None:
    meta = gpt2.meta
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        hidden = meta.transformer.h[0].output
        exit(3)
    with pytest.raises(UserCodeError, match="SystemExit: 3$"):
        gpt2.run(cap)
    assert_still_works(gpt2)


def test_an_unpicklable_saved_value_is_named(gpt2: Site) -> None:
    meta = gpt2.meta
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        logits = meta.lm_head.output.save()
        numbers = (i for i in range(3)).save()
    with pytest.raises(ResultNotSerializable, match="saved value.s. numbers cannot be sent"):
        gpt2.run(cap)
    assert_still_works(gpt2)


@pytest.mark.parametrize("compress", [True, False])
def test_garbage_and_truncated_payloads_are_refused(gpt2: Site, compress: bool) -> None:
    meta = gpt2.meta
    cap = gpt2.capture(compress)
    with meta.trace(PROMPT, backend=cap):
        logits = meta.lm_head.output.save()
    good = cap.blob
    for blob in (b"not a payload at all", good[: len(good) // 2], b""):
        with pytest.raises(PayloadUnreadable, match="could not be read"):
            run_request(gpt2.real, blob, compress, cap.env, gpt2.logs.append)
    assert_still_works(gpt2)


class Gadget:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


@pytest.mark.parametrize("compress", [True, False])
def test_a_pickle_gadget_is_refused_before_it_runs(gpt2: Site, tmp_path, compress: bool) -> None:
    marker = tmp_path / "pwned-XYZ"
    blob = dumps(Gadget(f"touch {marker}"))
    if compress:
        blob = zstandard.ZstdCompressor().compress(blob)
    with pytest.raises(GlobalNotAllowed, match="global posix.system is not allowed"):
        run_request(gpt2.real, blob, compress, {}, gpt2.logs.append)
    assert not marker.exists()
    assert_still_works(gpt2)


def test_a_gadget_among_a_blocks_variables_is_refused(gpt2: Site, tmp_path) -> None:
    meta = gpt2.meta
    marker = tmp_path / "pwned-XYZ"
    gadget = Gadget(f"touch {marker}")
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        value = gadget
        logits = meta.lm_head.output.save()
    with pytest.raises(GlobalNotAllowed, match="posix.system"):
        gpt2.run(cap)
    assert not marker.exists()
    assert_still_works(gpt2)


def test_a_payload_for_another_model_is_a_mismatch(gpt2: Site, llama: Site) -> None:
    cap = llama.capture()
    with llama.meta.trace(PROMPT, backend=cap):
        hidden = llama.meta.model.layers[0].output.save()
    with pytest.raises(ModelMismatch, match="Module:model.model"):
        gpt2.run(cap)
    assert_still_works(gpt2)


# --- env ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"attn_implementation": "sdpa", "peft": "someone/adapter"}, "allows no adapters"),
        ({"attn_implementation": "flash_attention_2"}, "not allowed here"),
        ({"attn_implementation": "sdpa", "device_map": "auto"}, "unknown env setting"),
    ],
)
def test_env_outside_the_policy_is_refused(gpt2: Site, env: dict, message: str) -> None:
    meta = gpt2.meta  # the block reads names from its scope: ship the model, not the fixture
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        logits = meta.lm_head.output.save()
    with pytest.raises(EnvNotAllowed, match=message) as caught:
        gpt2.run(cap, env=env)
    assert isinstance(caught.value, PayloadRefused)


def test_env_switches_the_attention_implementation(gpt2: Site) -> None:
    meta = gpt2.meta  # the block reads names from its scope: ship the model, not the fixture
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        logits = meta.lm_head.output.save()
    try:
        gpt2.run(cap, env={"attn_implementation": "eager"})
        assert gpt2.real.attn_implementation == "eager"
    finally:
        gpt2.real._remoteable_set_env({"attn_implementation": "sdpa"})
    gpt2.run(cap)  # the request's own env ({"attn_implementation": "sdpa"}) applies
    assert gpt2.real.attn_implementation == "sdpa"


# --- source caches (spec §11.5) ------------------------------------------------------------

CLIENT_FILE = "/home/researcher/experiment.py"


@contextlib.contextmanager
def own_trace_caches(filename: str) -> Iterator[None]:
    """Give the code inside nnsight trace caches of its own for `filename`.

    Client and site share one process here; this keeps the client's capture from reading (or
    leaving behind) the site's entries, as if it ran in a process of its own.
    """

    def take() -> tuple[dict, dict]:
        sources = {k: v for k, v in tracing_globals.SOURCES.items() if k == filename}
        blocks = {k: v for k, v in tracing_globals.BLOCKS.items() if k[0] == filename}
        for key in sources:
            del tracing_globals.SOURCES[key]
        for key in blocks:
            del tracing_globals.BLOCKS[key]
        return sources, blocks

    site_sources, site_blocks = take()
    try:
        yield
    finally:
        take()
        tracing_globals.SOURCES.update(site_sources)
        tracing_globals.BLOCKS.update(site_blocks)


def capture_script(site: Site, layer: int) -> Capture:
    """Capture a session written in a client script at CLIENT_FILE, as a researcher would."""
    source = (
        "with meta.session(backend=cap):\n"
        "    with meta.trace(PROMPT):\n"
        f"        hidden = meta.transformer.h[{layer}].output.save()\n"
    )
    cap = site.capture()
    with own_trace_caches(CLIENT_FILE):
        linecache.cache[CLIENT_FILE] = (len(source), None, source.splitlines(True), CLIENT_FILE)
        code = compile(source, CLIENT_FILE, "exec")
        exec(code, {"meta": site.meta, "cap": cap, "PROMPT": PROMPT})
        del linecache.cache[CLIENT_FILE]  # the site has no copy of the client's file
    return cap


def test_same_filename_different_code_runs_each_requests_own_code(gpt2: Site) -> None:
    real = gpt2.real
    results = []
    for layer in (0, 1):
        results.append(gpt2.run_and_load(capture_script(gpt2, layer))["hidden"])
        assert CLIENT_FILE not in tracing_globals.SOURCES and CLIENT_FILE not in linecache.cache
        assert not [key for key in tracing_globals.BLOCKS if key[0] == CLIENT_FILE]
    with real.trace(PROMPT):
        first = real.transformer.h[0].output.save()
        second = real.transformer.h[1].output.save()
    assert torch.equal(results[0], first) and torch.equal(results[1], second)


def test_linecache_is_left_as_before(gpt2: Site) -> None:
    meta = gpt2.meta
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        logits = meta.lm_head.output.save()
    before = linecache.cache.get(__file__)
    gpt2.run(cap)
    assert linecache.cache.get(__file__) is before


# --- source policy (sandbox layer 1): checked before anything compiles or runs ------------------


def line_of(marker: str) -> int:
    """The line of this file holding `marker`: shipped code keeps the file's line numbers."""
    with open(__file__) as file:
        return next(n for n, line in enumerate(file, 1) if marker in line and "line_of" not in line)


def test_a_refused_import_in_the_block_runs_nothing(gpt2: Site) -> None:
    meta = gpt2.meta
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        print("ran")
        import socket  # marker: refused import in the block

        host = socket.gethostname()
    gpt2.logs.clear()
    with pytest.raises(SourceRefused) as caught:
        gpt2.run(cap)
    message = caught.value.message
    assert caught.value.lineno == line_of("# marker: refused import in the block")
    assert "import of 'socket' is not allowed by site policy edif-default v1" in message
    assert __file__ in message
    assert gpt2.logs == []  # checked before the block ran: not even the print before it
    assert_still_works(gpt2)


def test_an_aliased_module_is_resolved_through_the_shipped_globals(gpt2: Site) -> None:
    meta = gpt2.meta
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        t = torch
        state = t.load("/etc/hosts")  # marker: aliased torch.load
    with pytest.raises(SourceRefused, match="'torch.load' is not allowed") as caught:
        gpt2.run(cap)
    assert caught.value.lineno == line_of("# marker: aliased torch.load")
    assert_still_works(gpt2)


def test_a_shipped_function_with_a_refused_import_is_never_compiled(
    gpt2: Site, monkeypatch
) -> None:
    meta = gpt2.meta

    def sneaky(value):
        import socket  # marker: refused in a shipped function

        return value, socket

    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        hidden = sneaky(meta.transformer.h[0].output)
    compiled: list[str] = []
    real_load_function = serialization._load_function
    monkeypatch.setattr(
        serialization,
        "_load_function",
        lambda *args: compiled.append(args[1]) or real_load_function(*args),
    )
    with pytest.raises(SourceRefused) as caught:
        gpt2.run(cap)
    message = caught.value.message
    assert caught.value.lineno == line_of("# marker: refused in a shipped function")
    assert "import of 'socket'" in message and f"[sneaky:{line_of('def sneaky')}]" in message
    assert compiled == []  # refused before nnsight's _load_function compiled it
    monkeypatch.undo()
    assert_still_works(gpt2)


class CallOf:
    """Pickles as `func(*args)`; `func` may be another CallOf: a hand-made payload's shape."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args

    def __call__(self, *args: object) -> None:  # pickle wants a callable; never called here
        raise AssertionError


def load_function_gadget(source: str) -> bytes:
    """Spec §12: a pickle that compiles a function with `_load_function` and calls it while
    it is being unpickled, with nothing but admitted globals."""
    built = CallOf(serialization._load_function, source, "f", None, None, None, "evil.py", 1)
    return pickle.dumps(CallOf(built), protocol=4)


def test_a_crafted_load_function_pickle_is_checked_before_compiling(gpt2: Site) -> None:
    blob = load_function_gadget("def f():\n    import os\n    return os.getpid()\n")
    with pytest.raises(SourceRefused) as caught:
        run_request(gpt2.real, blob, False, {}, gpt2.logs.append)
    assert caught.value.lineno == 2 and "[f:1] evil.py" in caught.value.message
    assert_still_works(gpt2)


def test_a_shipped_function_cannot_run_while_its_payload_is_unpickled(gpt2: Site) -> None:
    # Admitted source, but called from inside the pickle, before the block was checked.
    blob = load_function_gadget("def f():\n    return 1\n")
    with pytest.raises(PayloadUnreadable, match="while its payload was still being checked"):
        run_request(gpt2.real, blob, False, {}, gpt2.logs.append)
    assert_still_works(gpt2)


class Tamper(Capture):
    """Serializes like RequestModel.serialize, with the (source, globals, locals) edited."""

    def __init__(self, model, edit: Callable[[tuple], tuple]) -> None:
        super().__init__(model, compress=False)
        self.edit = edit

    def __call__(self, tracer) -> None:
        frame = tracer.info.frame
        parts = reduce_block(tracer.node, frame.f_globals, dict(frame.f_locals))
        self.blob = dumps((tracer, self.edit(parts)))


def test_shipped_globals_cannot_replace_the_builtins(gpt2: Site) -> None:
    meta = gpt2.meta
    cap = Tamper(meta, lambda parts: (parts[0], {**parts[1], "__builtins__": {}}, parts[2]))
    with meta.trace(PROMPT, backend=cap):
        logits = meta.lm_head.output.save()
    with pytest.raises(SourceRefused, match="the block's globals sets '__builtins__'"):
        gpt2.run(cap)
    assert_still_works(gpt2)


def test_a_module_inside_a_shipped_value_is_refused(gpt2: Site) -> None:
    meta = gpt2.meta
    holder = types.SimpleNamespace(np=np)  # `holder.np.load` would be out of the check's sight
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        zeros = holder.np.zeros(2)
        logits = meta.lm_head.output.save()
    with pytest.raises(GlobalNotAllowed, match="ships the module 'numpy' inside a value"):
        gpt2.run(cap)
    assert_still_works(gpt2)


def test_the_request_is_checked_against_the_sites_own_source_policy(gpt2: Site) -> None:
    meta = gpt2.meta
    strict = SourcePolicy(name="no-prints", version=7)
    strict = dataclasses.replace(strict, forbidden_calls=strict.forbidden_calls | {"print"})
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        print(meta.lm_head.output.shape)
    policy = PayloadPolicy(source=strict)
    with pytest.raises(
        SourceRefused, match="the builtin .print. is not allowed by site policy no-prints v7"
    ):
        run_request(gpt2.real, cap.blob, cap.compress, cap.env, gpt2.logs.append, policy)
    gpt2.run(cap)  # the default policy admits it
    assert_still_works(gpt2)


def test_a_probe_class_from_the_clients_code_travels_and_runs(gpt2: Site) -> None:
    meta, real = gpt2.meta, gpt2.real

    class Probe(torch.nn.Module):
        """A linear probe, defined in the researcher's script: it travels by value."""

        def __init__(self, width: int) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(width, 2)

        def forward(self, hidden):
            return torch.softmax(self.linear(hidden), dim=-1)

    probe = Probe(64)
    cap = gpt2.capture()
    with meta.trace(PROMPT, backend=cap):
        scores = probe(meta.transformer.h[0].output[:, -1, :]).save()
    remote = gpt2.run_and_load(cap)
    with real.trace(PROMPT):
        scores = probe(real.transformer.h[0].output[:, -1, :]).save()
    assert torch.equal(remote["scores"], scores)
