"""The restricted runtime (sandbox layer 2): what the source check misses still fails.

The source check is switched off here (as if it had missed a construct), and the block runs
through `run_request` as on a site: imports outside the policy, forbidden builtins and refused
attribute names raise `SandboxViolation` inside the block, while legitimate code, invokes and
sessions keep working.
"""

# ruff: noqa: F841 - names bound in a trace block are read by the backend

from __future__ import annotations

import io

import nnsight
import pytest
import torch
import zstandard
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

from edif.demo import TINY_GPT2, load
from edif.errors import SandboxViolation, UserCodeError
from site_agent import execution, unpickler
from site_agent.execution import run_request
from site_agent.runtime_guard import attribute_refused, builtins_dict, restricted_builtins
from site_agent.source_policy import SourcePolicy

PROMPT = "the capital of france is"


class Capture(Backend):
    def __init__(self) -> None:
        self.blob = b""

    def __call__(self, tracer) -> None:
        nnsight.ndif.pull_env()
        self.blob = RequestModel.serialize(tracer, True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    home = tmp_path_factory.mktemp("edif-home")
    return load(TINY_GPT2, home=home), load(TINY_GPT2, home=home, dispatch=True)


@pytest.fixture
def no_static_check(monkeypatch):
    monkeypatch.setattr(execution, "check_source", lambda *a, **k: None)
    monkeypatch.setattr(execution, "check_namespace", lambda *a, **k: None)
    # Shipped functions are checked inside the unpickler (`_load_function`, `_fill`).
    monkeypatch.setattr(unpickler, "check_source", lambda *a, **k: None)
    monkeypatch.setattr(unpickler, "check_namespace", lambda *a, **k: None)


def run(models, cap: Capture) -> dict:
    out = run_request(models[1], cap.blob, True, {}, lambda _: None)
    data = zstandard.ZstdDecompressor().decompress(out.result_bytes)
    return torch.load(io.BytesIO(data), weights_only=False)


def expect_violation(models, cap: Capture, fragment: str) -> None:
    with pytest.raises(UserCodeError) as caught:
        run(models, cap)
    assert "SandboxViolation" in caught.value.message and fragment in caught.value.message


def test_an_import_the_static_check_missed_fails_at_run_time(models, no_static_check) -> None:
    meta, _ = models
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        import os  # noqa: F401 - runs on the site, where it must fail

        x = meta.lm_head.output.save()
    expect_violation(models, cap, "import of 'os'")


@pytest.mark.parametrize("name", ["eval", "exec", "compile", "open", "globals", "vars"])
def test_forbidden_builtins_raise_when_called(models, no_static_check, name: str) -> None:
    meta, _ = models
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        x = meta.lm_head.output.save()
        if name == "eval":
            eval("1")
        elif name == "exec":
            exec("y = 1")
        elif name == "compile":
            compile("1", "f", "eval")
        elif name == "open":
            open("/etc/passwd")  # noqa: SIM115
        elif name == "globals":
            globals()
        else:
            vars()
    expect_violation(models, cap, f"{name}()")


def eval_in_block() -> None:  # a function whose globals a block could reach for
    return None


def test_getattr_with_a_built_name_is_refused(models, no_static_check) -> None:
    meta, _ = models
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        g = getattr(eval_in_block, "__glo" + "bals__")
        x = meta.lm_head.output.save()
    expect_violation(models, cap, "'__globals__'")


def test_a_subclasses_walk_by_built_names_is_refused(models, no_static_check) -> None:
    meta, _ = models
    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        base = getattr(getattr((), "__cla" + "ss__"), "__ba" + "se__")
        x = meta.lm_head.output.save()
    expect_violation(models, cap, "'__class__'")


def test_a_shipped_function_imports_through_the_guard(models, no_static_check) -> None:
    meta, _ = models

    def helper(t):  # nested: the client ships it by source (`_load_function`)
        return __import__("os").getcwd(), t

    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        x = helper(meta.lm_head.output)[1].save()
    expect_violation(models, cap, "import of 'os'")


def test_a_shipped_function_cannot_open_files(models, no_static_check) -> None:
    meta, _ = models

    def helper(t):
        return open("/etc/passwd").read(), t  # noqa: SIM115

    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        x = helper(meta.lm_head.output)[1].save()
    expect_violation(models, cap, "open()")


def test_functions_a_shipped_function_defines_inherit_the_guard(models, no_static_check) -> None:
    meta, _ = models

    def helper(t):
        inner = lambda: eval("1")  # noqa: E731 - defined at run time, on the site
        return inner(), t

    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        x = helper(meta.lm_head.output)[1].save()
    expect_violation(models, cap, "eval()")


def test_a_shipped_torch_helper_still_matches_local(models) -> None:
    meta, real = models

    def centred(t, scale):
        import math

        return (t - t.mean(dim=-1, keepdim=True)) * math.sqrt(scale)

    cap = Capture()
    with meta.trace(PROMPT, backend=cap):
        x = centred(meta.lm_head.output, 2.0).save()
    got = run(models, cap)
    with real.trace(PROMPT):
        ref = centred(real.lm_head.output, 2.0).save()
    assert torch.equal(got["x"], ref)


def test_allowed_imports_and_a_session_still_work(models) -> None:
    meta, real = models
    cap = Capture()
    with meta.session(backend=cap):
        with meta.trace(PROMPT):
            import math

            a = meta.lm_head.output.save()
        with meta.trace(PROMPT):
            b = (meta.lm_head.output * math.pi).save()
    got = run(models, cap)
    with real.trace(PROMPT):
        ref = real.lm_head.output.save()
    assert torch.equal(got["a"], ref) and torch.equal(got["b"], ref * 3.141592653589793)


def test_the_guard_tables() -> None:
    policy = SourcePolicy()
    table = restricted_builtins(policy)
    assert table["print"] is print and table["len"] is len
    with pytest.raises(SandboxViolation):
        table["open"]("/etc/passwd")
    with pytest.raises(SandboxViolation):
        table["__import__"]("subprocess")
    with pytest.raises(SandboxViolation):
        table["__import__"]("torch", None, None, ("load",))
    assert table["__import__"]("math").pi > 3
    assert attribute_refused("__subclasses__", policy) and not attribute_refused("weight", policy)
    assert builtins_dict(policy) is not builtins_dict(policy)
