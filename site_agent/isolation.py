"""Job isolation: detect state a job changed that the worker shares with later jobs (layer 4).

Role: a model worker runs many users' jobs in one process. What one job leaves behind in a
shared module (`torch.save = None`), on the model (a zeroed weight, a hook, a swapped
submodule) or in torch's global settings would reach the next user's job. Layers 1 and 2
refuse the ways to do that which they can see; this layer checks the outcome.

Flow: the worker takes a `Fingerprint` of the shared state once, after the model loaded (the
baseline), and another after every job; `differences(baseline, after)` names what changed.
Any difference ends the job with `WorkerContaminated` (its result withheld) and the agent
replaces the worker before the next job runs (`executor.py`), so no restore has to be right.
One fingerprint per job: nothing else runs on the worker between jobs, so the baseline of
job N+1 is the state after job N when that state equals the baseline.

What a fingerprint holds (cheap: about 0.3 ms on the demo models, see bench/sandbox.py):
- for watched modules and classes (`builtins`, `torch`, `torch.nn`, `torch.nn.functional`,
  `torch.Tensor`, `torch.nn.Module`, `nnsight`, ...): the `id()` of every callable, class or
  module attribute. Data attributes (caches, counters) are not compared, and attributes a
  library adds lazily (a submodule imported on first use) are not either;
- `sys.modules`: the `id()` of every module, so none can be replaced or removed;
- the model: its module tree (names and object ids), each module's hook counts, torch's
  global module hooks, and every parameter and buffer's identity, storage pointer, shape,
  dtype, device, `requires_grad`, version counter and a CRC-32 of its bytes (CPU: whole for
  tensors up to 4096 elements, a fixed-stride sample plus the last element for larger ones,
  so an edit of a single element of a large CPU weight that misses the sample and bypasses
  the version counter through `.data` can go unseen) or an integer sum of its bits
  (accelerators: one reduction per tensor, one sync);
- torch's process-wide settings: default dtype and device, grad and inference mode, thread
  count, deterministic algorithms, anomaly detection.

Not covered: state inside C extensions that Python cannot see, attributes of modules not
watched (layer 1 refuses assignment into any module), and RNG state (`torch.manual_seed` in
one job sets the seed the next job's sampling starts from; not a leak of data).
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

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
class Fingerprint:
    namespaces: dict[str, dict[str, int]]  # watched module/class -> attribute -> id(value)
    sys_modules: dict[str, int]
    tree: tuple  # (name, id(module), hook counts) per module, and the global hook counts
    tensors: dict[str, tuple]  # parameter/buffer name -> identity and content digest
    torch_settings: tuple


def fingerprint(model: Any) -> Fingerprint:
    """The shared state `model`'s worker must not see change between jobs (see module doc)."""
    module = getattr(model, "_module", model)  # an nnsight model wraps the torch module
    return Fingerprint(
        namespaces={name: _callables(vars(obj)) for name, obj in _watched()},
        sys_modules={k: id(v) for k, v in list(sys.modules.items())},
        tree=_tree(module),
        tensors=_tensors(module),
        torch_settings=_torch_settings(),
    )


def differences(before: Fingerprint, after: Fingerprint) -> list[str]:
    """What changed from `before` to `after`, one line each (empty: nothing shared changed)."""
    found: list[str] = []
    for name, attrs in before.namespaces.items():
        now = after.namespaces.get(name, {})
        found += [
            f"{name}.{attr} was replaced or removed"
            for attr in attrs
            if now.get(attr) != attrs[attr]
        ]
    found += [
        f"sys.modules[{name!r}] was replaced or removed"
        for name, ident in before.sys_modules.items()
        if after.sys_modules.get(name) != ident
    ]
    if before.tree != after.tree:
        found.append("the model's module tree or hooks changed")
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


def _callables(namespace: Any) -> dict[str, int]:
    return {
        k: id(v) for k, v in list(namespace.items()) if callable(v) or isinstance(v, ModuleType)
    }


def _tree(module: torch.nn.Module) -> tuple:
    shape = tuple(
        (name, id(sub), tuple(len(getattr(sub, h, ())) for h in _HOOK_DICTS))
        for name, sub in module.named_modules(remove_duplicate=False)
    )
    hooks = torch.nn.modules.module
    return shape, tuple(len(getattr(hooks, h, ())) for h in _GLOBAL_HOOKS)


def _tensors(module: torch.nn.Module) -> dict[str, tuple]:
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    out: dict[str, tuple] = {}
    device_sums: list[tuple[str, torch.Tensor]] = []
    for name, t in named:
        if t is None:
            continue
        ident = (id(t), t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), t.requires_grad)
        out[name] = (*ident, t._version)
        data = t.detach()
        if data.device.type == "cpu" and data.is_contiguous():
            out[name] += (_crc(data),)
        elif data.device.type != "meta":
            device_sums.append((name, _bit_sum(data)))
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


def _crc(data: torch.Tensor) -> int:
    flat = data.reshape(-1)
    if flat.numel() > FULL_HASH_MAX_ELEMENTS:
        stride = -(-flat.numel() // FULL_HASH_MAX_ELEMENTS)
        flat = torch.cat([flat[::stride], flat[-1:]]).contiguous()
    return zlib.crc32(flat.view(torch.uint8).numpy())


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
