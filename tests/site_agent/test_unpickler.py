"""AllowlistUnpickler and PayloadPolicy on hand-made pickles: what is admitted, what is refused."""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct

import cloudpickle.cloudpickle as cloudpickle_impl
import numpy as np
import pytest
import torch
from nnsight.intervention import serialization
from nnsight.intervention.envoy import Envoy
from nnsight.tracing import tracer as tracer_module

from edif.errors import GlobalNotAllowed, PayloadRefused
from site_agent.unpickler import AllowlistUnpickler, PayloadPolicy


def load(data: bytes, policy: PayloadPolicy | None = None) -> object:
    return AllowlistUnpickler(io.BytesIO(data), {}, policy=policy).load()


def global_pickle(module: str, name: str) -> bytes:
    """A protocol-4 pickle whose whole content is one STACK_GLOBAL lookup of module.name."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + struct.pack("<B", len(raw)) + raw  # SHORT_BINUNICODE

    return b"\x80\x04" + text(module) + text(name) + b"\x93."  # STACK_GLOBAL, STOP


class Call:
    """Pickles as a call of `func(*args)`: how a gadget looks on the wire."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def test_plain_data_round_trips() -> None:
    value = {
        "t": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)[:, 1],
        "p": torch.nn.Parameter(torch.ones(2)),
        "od": collections.OrderedDict(a=1),
        "misc": (slice(1, 2), range(3), {1}, frozenset({2}), 1 + 2j, b"x", torch.Size([2])),
        "dev": (torch.device("cpu"), torch.float16),
        "np": np.arange(3.0),
    }
    loaded = load(pickle.dumps(value, protocol=4))
    assert torch.equal(loaded["t"], value["t"]) and loaded["t"].dtype == torch.bfloat16
    assert isinstance(loaded["p"], torch.nn.Parameter) and loaded["p"].requires_grad
    assert loaded["od"] == value["od"] and loaded["misc"] == value["misc"]
    assert loaded["dev"] == value["dev"]
    assert np.array_equal(loaded["np"], value["np"])


def test_os_system_gadget_is_refused_before_it_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps(Call(os.system, f"touch {marker}"), protocol=4)
    with pytest.raises(GlobalNotAllowed, match="global posix.system is not allowed"):
        load(blob)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("subprocess", "Popen"),
        # A module attribute reached through an admitted prefix is not nnsight's own.
        ("nnsight.tracing.tracer", "os.system"),
        ("nnsight.tracing.tracer", "sys.modules"),
        ("nnsight.tracing.tracer", "Tracer.__init__"),
        # Nested unpicklers would ignore the allowlist, however they are reached.
        ("nnsight.intervention.serialization", "loads"),
        ("nnsight.intervention", "serialization.loads"),
        # Under the class-only prefix, a method is not a class.
        ("torch.nn.modules.module", "Module.register_forward_hook"),
        ("torch", "load"),
    ],
)
def test_globals_outside_the_policy_are_refused(module: str, name: str) -> None:
    with pytest.raises(GlobalNotAllowed, match="is not allowed in a request payload"):
        load(global_pickle(module, name))


@pytest.mark.parametrize(
    ("module", "name", "expected"),
    [
        ("nnsight.tracing.tracer", "Tracer.Info", tracer_module.Tracer.Info),
        ("nnsight.intervention.envoy", "Envoy", Envoy),
        ("torch.nn.modules.linear", "Linear", torch.nn.Linear),
        ("collections", "OrderedDict", collections.OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2", torch._utils._rebuild_tensor_v2),
    ],
)
def test_admitted_globals_resolve(module: str, name: str, expected: object) -> None:
    assert load(global_pickle(module, name)) is expected


def test_subimport_only_imports_allowed_roots() -> None:
    assert load(pickle.dumps(Call(cloudpickle_impl.subimport, "torch.nn"))) is torch.nn
    with pytest.raises(GlobalNotAllowed, match="module os is not allowed"):
        load(pickle.dumps(Call(cloudpickle_impl.subimport, "os")))


def test_builtin_type_only_hands_out_listed_types() -> None:
    assert load(pickle.dumps(Call(cloudpickle_impl._builtin_type, "MethodType"))).__name__ == (
        "method"
    )
    with pytest.raises(GlobalNotAllowed, match="types.CodeType"):
        load(pickle.dumps(Call(cloudpickle_impl._builtin_type, "CodeType")))


def test_nested_tensor_bytes_cannot_smuggle_a_pickle(tmp_path) -> None:
    marker = tmp_path / "pwned"
    inner = pickle.dumps(Call(os.system, f"touch {marker}"), protocol=2)
    with pytest.raises(PayloadRefused, match="could not be loaded safely"):
        load(pickle.dumps(Call(torch.storage._load_from_bytes, inner)))
    assert not marker.exists()


def test_fill_cannot_rewrite_a_site_modules_globals() -> None:
    blob = pickle.dumps(Call(serialization._fill, tracer_module.save, {"edif_evil": 1}))
    with pytest.raises(PayloadRefused, match="globals of a site function"):
        load(blob)
    assert "edif_evil" not in vars(tracer_module)


def test_class_setstate_cannot_patch_a_site_class() -> None:
    blob = pickle.dumps(Call(cloudpickle_impl._class_setstate, Envoy, ({"edif_evil": 1}, {})))
    with pytest.raises(PayloadRefused, match="attributes of a site class"):
        load(blob)
    assert not hasattr(Envoy, "edif_evil")


def test_policy_can_be_extended() -> None:
    policy = PayloadPolicy()
    extended = dataclasses.replace(policy, globals=policy.globals | {"builtins.getattr"})
    assert load(global_pickle("builtins", "getattr"), extended) is getattr
    with pytest.raises(GlobalNotAllowed):
        load(global_pickle("builtins", "getattr"), policy)
