"""Job isolation: detect state a job changed that the worker shares with later jobs (layer 4).

Role: a model worker runs many users' jobs in one process. What one job leaves behind in a
shared module (`torch.save = None`), on the model (a zeroed weight, a hook, a swapped
submodule) or in torch's global settings would reach the next user's job. Layers 1 and 2
refuse the ways to do that which they can see; this layer checks the outcome.

Flow: the worker takes a baseline `Fingerprint` of the shared state once, after the model
loaded (`fingerprint(model, baseline=True)`, which also notes which attributes are compared),
and another after every job; `differences(baseline, after)` names what changed. Any
difference ends the job with `WorkerContaminated` (its result withheld) and the agent
replaces the worker before the next job runs (`executor.py`), so no restore has to be right.
After a clean job its fingerprint (with the baseline's compared attributes) is the next
job's baseline.

What a fingerprint holds (cheap: about 0.3 ms per job on the demo models, see
bench/sandbox.py):
- for watched modules and classes (`builtins`, `torch`, `torch.nn`, `torch.nn.functional`,
  `torch.Tensor`, `torch.nn.Module`, `nnsight`, ...): their attributes, keys and values in
  order. The callable, class or module attributes the baseline had are compared by identity;
  data attributes (caches, counters) are not, and attributes a library adds lazily (a
  submodule imported on first use) are not either. Where every entry is still the same
  object the comparison is two loops in C; only a namespace where something differs is
  walked name by name;
- `sys.modules`, the same way: no module may be replaced or removed;
- the model: its module tree (names and object ids), each module's hook counts, torch's
  global module hooks, and every parameter and buffer's identity, storage pointer, shape,
  dtype, device, `requires_grad`, version counter and a CRC-32 of its bytes, read straight
  from its memory (CPU: whole for tensors up to 4096 elements, a fixed-stride sample plus
  the last element for larger ones, so an edit of a single element of a large CPU weight
  that misses the sample and bypasses the version counter through `.data` can go unseen)
  or an integer sum of its bits (accelerators: one reduction per tensor, one sync);
- torch's process-wide settings: default dtype and device, grad and inference mode, thread
  count, deterministic algorithms, anomaly detection.

Snapshots hold the values themselves, not their `id()`s, so a replaced object cannot be
freed and its address reused by the replacement; comparisons use identity, never `==`,
which a replacement could answer for itself.

Not covered: state inside C extensions that Python cannot see, attributes of modules not
watched (layer 1 refuses assignment into any module), and RNG state (`torch.manual_seed` in
one job sets the seed the next job's sampling starts from; not a leak of data).
"""

from __future__ import annotations

import ctypes
import operator
import sys
import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

WATCHED_MODULES = (
    "builtins",
    "torch",
    "torch.nn",
    "torch.nn.functional",
    "torch.nn.modules.module",
    "torch.serialization",
    "nnsight",
    "nnsight.tracing.globals",
    "nnsight.intervention.envoy",
    "nnsight.intervention.interleaver",
)
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_module_registration_hooks",
    "_global_parameter_registration_hooks",
    "_global_buffer_registration_hooks",
)


@dataclass(frozen=True)
class Snapshot:
    """A namespace's keys and values, in its order (two C-level tuple copies).

    It holds the values themselves, not their `id()`s: an object the snapshot holds cannot be
    freed, so no replacement can ever reuse its address and look unchanged.
    """

    keys: tuple
    values: tuple

    @classmethod
    def of(cls, namespace: Any) -> Snapshot:
        # One C-level copy (a dict's or a class's mappingproxy's `.copy()`; `dict(x)` is five
        # times slower): a concurrent import cannot change it midway.
        copied = namespace.copy()
        return cls(tuple(copied), tuple(copied.values()))

    def unchanged_in(self, later: Snapshot) -> bool:
        """Whether `later` starts with exactly these keys and values (same objects).

        Entries added after them (a module imported lazily, an attribute set on first use)
        do not count; anything removed, replaced or reordered does. Identity, never `==`: a
        replacement cannot answer for itself.
        """
        return (
            len(later.keys) >= len(self.keys)
            and all(map(operator.is_, self.keys, later.keys))
            and all(map(operator.is_, self.values, later.values))
        )

    def replaced(self, later: Snapshot, names: Collection[str] | None = None) -> list[str]:
        """The keys (among `names`, default all) whose value `later` lacks or replaced."""
        now = dict(zip(later.keys, later.values, strict=True))
        return [
            key
            for key, value in zip(self.keys, self.values, strict=True)
            if (names is None or key in names) and now.get(key, _MISSING) is not value
        ]


_MISSING = object()


@dataclass(frozen=True)
class Fingerprint:
    namespaces: dict[str, Snapshot]  # watched module/class -> its attributes
    sys_modules: Snapshot
    tree: tuple  # (name, id(module), hook counts) per module, and the global hook counts
    tensors: dict[str, tuple]  # parameter/buffer name -> identity and content digest
    torch_settings: tuple
    # Per watched namespace, the attributes compared: those holding a callable, class or
    # module. Only a baseline has them (`fingerprint(model, baseline=True)`).
    compared: dict[str, frozenset[str]] | None = None


def fingerprint(model: Any, baseline: bool = False) -> Fingerprint:
    """The shared state `model`'s worker must not see change between jobs (see module doc).

    `baseline`: also note which namespace attributes are compared (those whose value is
    callable, a class or a module), once, for the fingerprint later ones are compared with.
    """
    module = getattr(model, "_module", model)  # an nnsight model wraps the torch module
    namespaces = {name: Snapshot.of(vars(obj)) for name, obj in _watched()}
    tree, tensors = _model_state(module)
    compared = None
    if baseline:
        compared = {name: _callables(snap.keys, snap.values) for name, snap in namespaces.items()}
    return Fingerprint(
        namespaces=namespaces,
        sys_modules=Snapshot.of(sys.modules),
        tree=tree,
        tensors=tensors,
        torch_settings=_torch_settings(),
        compared=compared,
    )


def differences(before: Fingerprint, after: Fingerprint) -> list[str]:
    """What changed from `before` to `after`, one line each (empty: nothing shared changed).

    `before` is a baseline. Where every entry `before` recorded still holds the same object
    (`Snapshot.unchanged_in`, loops in C), nothing is looked at one by one; a namespace
    where something differs is walked, and then only its compared attributes count (a data
    attribute such as a cache or counter may change).
    """
    found: list[str] = []
    compared = before.compared or {}
    empty = Snapshot((), ())
    for name, snap in before.namespaces.items():
        now = after.namespaces.get(name, empty)
        if not snap.unchanged_in(now):
            found += [
                f"{name}.{attr} was replaced or removed"
                for attr in snap.replaced(now, compared.get(name))
            ]
    if not before.sys_modules.unchanged_in(after.sys_modules):
        found += [
            f"sys.modules[{key!r}] was replaced or removed"
            for key in before.sys_modules.replaced(after.sys_modules)
        ]
    if before.tree != after.tree:
        found.append("the model's module tree or hooks changed")
    if before.tensors != after.tensors:
        for name, state in before.tensors.items():
            if after.tensors.get(name) != state:
                found.append(f"the model's tensor {name} changed")
        if set(after.tensors) - set(before.tensors):
            found.append("the model gained parameters or buffers")
    if before.torch_settings != after.torch_settings:
        found.append("torch's global settings changed (default dtype/device, grad mode, ...)")
    return found


def _watched() -> Iterable[tuple[str, Any]]:
    for name in WATCHED_MODULES:
        module = sys.modules.get(name)
        if isinstance(module, ModuleType):
            yield name, module
    yield "torch.Tensor", torch.Tensor
    yield "torch.nn.Module", torch.nn.Module


def _callables(keys: tuple, values: tuple) -> frozenset[str]:
    return frozenset(
        k for k, v in zip(keys, values, strict=True) if callable(v) or isinstance(v, ModuleType)
    )


def _model_state(module: torch.nn.Module) -> tuple[tuple, dict[str, tuple]]:
    """(module tree with hook counts, parameter/buffer states), in one walk of the tree.

    The same names `named_parameters`/`named_buffers(remove_duplicate=False)` give, read
    from each module's own dicts: one traversal instead of three.
    """
    shape = []
    named: list[tuple[str, Any]] = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        own = sub.__dict__
        shape.append((prefix, id(sub), tuple(len(own.get(h, ())) for h in _HOOK_DICTS)))
        dot = f"{prefix}." if prefix else ""
        named += [(dot + k, v) for k, v in own.get("_parameters", {}).items()]
        named += [(dot + k, v) for k, v in own.get("_buffers", {}).items()]
    hooks = torch.nn.modules.module
    tree = tuple(shape), tuple(len(getattr(hooks, h, ())) for h in _GLOBAL_HOOKS)
    return tree, _tensors(named)


def _tensors(named: list[tuple[str, Any]]) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    device_sums: list[tuple[str, torch.Tensor]] = []
    for name, t in named:
        if t is None:
            continue
        device, address = t.device, t.data_ptr()
        state = (id(t), address, t.shape, t.dtype, device, t.requires_grad, t._version)
        if device.type == "cpu" and t.is_contiguous():
            out[name] = (*state, _crc(t, address))
        elif device.type != "meta":
            out[name] = state
            device_sums.append((name, _bit_sum(t.detach())))
        else:
            out[name] = state
    if device_sums:  # one host sync for all accelerator tensors
        values = torch.stack([s.to("cpu") for _, s in device_sums]).tolist()
        for (name, _), value in zip(device_sums, values, strict=True):
            out[name] += (value,)
    return out


# Tensors up to this size are hashed whole; larger ones by a fixed stride sample, so the
# per-job cost stays near a millisecond on CPU for GPT-2-small-sized models instead of growing
# with every weight byte (a full CRC of 500 MB costs ~0.3 s per job; 256k-element samples
# still cost 27 ms on GPT-2 small, 4096-element ones about a millisecond).
FULL_HASH_MAX_ELEMENTS = 1 << 12


_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _crc(data: Any, address: int) -> int:
    """CRC-32 of a contiguous CPU tensor's bytes at `address`, whole or sampled (see above).

    The bytes are read through a buffer over the tensor's memory rather than through torch
    ops (reshape, slice, cat, view: ~5 µs of dispatch per tensor, most of the cost).
    """
    count, size = data.numel(), data.element_size()
    if count == 0:
        return 0
    raw = memoryview((ctypes.c_ubyte * (count * size)).from_address(address)).cast("B")
    if count <= FULL_HASH_MAX_ELEMENTS:
        return zlib.crc32(raw)
    unit = next(u for u in (8, 4, 2, 1) if size % u == 0)  # complex128: 8 of its 16 bytes
    step = -(-count // FULL_HASH_MAX_ELEMENTS) * (size // unit)
    sample = np.ascontiguousarray(np.frombuffer(raw, dtype=_WORDS[unit])[::step])
    return zlib.crc32(raw[-size:], zlib.crc32(sample))


def _bit_sum(data: torch.Tensor) -> torch.Tensor:
    flat = data.contiguous().reshape(-1)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    with torch.no_grad():
        return flat.view(width).sum(dtype=torch.int64)


def _torch_settings() -> tuple:
    return (
        torch.get_default_dtype(),
        str(torch.get_default_device()),
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_anomaly_enabled(),
    )
