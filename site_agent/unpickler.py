"""The restricted unpickler a site deserializes request payloads with.

`RequestModel.deserialize(..., unpickler=...)` builds `unpickler(file, persistent_objects)`
and calls `load()`. Pickle resolves every global through `find_class` *before* the opcode
that calls it, so refusing there means a gadget naming `posix.system` fails before anything
runs. `AllowlistUnpickler.find_class` admits only what legitimate nnsight 0.8.1 payloads need
(spec §9, §12), as listed in `PayloadPolicy`, and raises `GlobalNotAllowed` otherwise.

A few admitted globals are replaced by guarded wrappers, because the originals would reopen
the door the allowlist closes: `cloudpickle.subimport` (imports any module),
`torch.storage._load_from_bytes` (runs an unrestricted nested `torch.load`), cloudpickle's
`_builtin_type` (hands out any `types.*`, `CodeType` included) and nnsight's `_fill` (updates
the globals of *any* function, e.g. a site module's).

This is defence in depth only: payloads legitimately carry source that the site compiles
(`_load_function`) and runs (the block itself). Isolation of the worker is the control.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle.cloudpickle as cloudpickle_impl
import torch
from nnsight.intervention import serialization
from nnsight.intervention.serialization import CustomCloudUnpickler

from edif.errors import GlobalNotAllowed, PayloadRefused

# The globals §9 lists for real payloads (trace, session, generate, shipped tensors), plus the
# plain data types user code commonly ships. Anything that can run arbitrary code by itself
# (getattr, eval, exec, compile, open, __import__, os.*, subprocess.*) is deliberately absent.
_NNSIGHT_GLOBALS = frozenset(
    {
        "nnsight.intervention.tracer.InterleavingTracer",
        "nnsight.tracing.tracer.Tracer",
        "nnsight.tracing.tracer.Tracer.Info",
        "nnsight.tracing.util.SerializedFrame",
        "nnsight.intervention.envoy.Envoy",
        "nnsight.modeling.transformers.TransformersModel",
        "nnsight.modeling.transformers.GeneratorEnvoy",
        "nnsight.modeling.transformers.TransformersModel._call",
        # Dynamic functions travel as source (generate's `fn`, user helpers, lambdas).
        "nnsight.intervention.serialization._load_function",
        "nnsight.intervention.serialization._fill",
    }
)

_CLOUDPICKLE_GLOBALS = frozenset(
    {
        "cloudpickle.cloudpickle._builtin_type",  # wrapped: only `builtin_types` names
        "cloudpickle.cloudpickle.subimport",  # wrapped: only `import_roots` modules
        # Modules registered for by-value pickling (`nnsight.register`, `pull_env`) arrive as a
        # fresh module object built from shipped values; nothing is imported or executed, and
        # their `__spec__` brings the two importlib classes below (constructed, never called).
        "cloudpickle.cloudpickle.dynamic_subimport",
        "_frozen_importlib.ModuleSpec",
        "_frozen_importlib_external.SourceFileLoader",
        # Classes defined in the client's notebook or script (an SAE, a probe) travel by value:
        # an empty class from `type` and admitted bases, then its attributes, whose methods
        # arrive as source (`_load_function`). `_class_setstate` is wrapped to touch only the
        # classes this payload built. Dataclasses and namedtuples also need cloudpickle's
        # bytecode route (`_make_function`, `types.CodeType`) and are refused by default.
        "cloudpickle.cloudpickle._make_skeleton_class",  # wrapped: records what it built
        "cloudpickle.cloudpickle._class_setstate",  # wrapped: only on those
        "cloudpickle.cloudpickle._make_empty_cell",
        "cloudpickle.cloudpickle._make_cell",
        "builtins.type",
        "builtins.classmethod",
        "builtins.staticmethod",
        "builtins.property",
    }
)

# Tensor and storage rebuilders: they only allocate and copy data.
_TORCH_GLOBALS = frozenset(
    {
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_device_tensor_from_numpy",
        "torch._utils._rebuild_device_tensor_from_cpu_tensor",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_nested_tensor",
        "torch._tensor._rebuild_from_type_v2",
        "torch.storage._load_from_bytes",  # wrapped: nested load with weights_only=True
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "torch.Size",
        "torch.device",
        "torch.strided",
        "torch.sparse_coo",
        "torch.contiguous_format",
        "torch.channels_last",
        "torch.preserve_format",
    }
)

# Every `torch.<dtype>` object (torch.float32, torch.bfloat16, ...), which pickle by name.
_TORCH_DTYPES = frozenset(
    f"torch.{name}" for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)
)

_DATA_GLOBALS = frozenset(
    {
        # Value constructors without side effects; containers hold only admitted objects.
        "builtins.slice",
        "builtins.range",
        "builtins.complex",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.bytes",
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "builtins.int",
        "builtins.float",
        "builtins.bool",
        "builtins.str",
        "builtins.object",
        "collections.OrderedDict",
        "collections.defaultdict",
        "collections.deque",
        "collections.Counter",
        # Binds admitted callables to arguments; calling happens later, in the block.
        "functools.partial",
        # numpy arrays and scalars shipped as locals (numpy 2 and 1 module paths).
        "numpy.ndarray",
        "numpy.dtype",
        "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
    }
)

DEFAULT_GLOBALS = (
    _NNSIGHT_GLOBALS | _CLOUDPICKLE_GLOBALS | _TORCH_GLOBALS | _TORCH_DTYPES | _DATA_GLOBALS
)

# nnsight's own classes and functions (envoys of other model kinds, batchers, hints). An object
# admitted by prefix must be named by its canonical `__module__.__qualname__`, as pickle writes
# every global; so `nnsight.tracing.tracer` + `os.system` (a module attribute reached through
# the dotted name) is refused, and so is a denied function reached through another module.
DEFAULT_PREFIXES = ("nnsight.intervention.", "nnsight.tracing.", "nnsight.modeling.")

# Prefixes under which only classes are admitted: torch's layers, the usual members and bases of
# a user's own module (nn.Linear in an SAE). Building one runs no user-chosen code.
DEFAULT_CLASS_PREFIXES = ("torch.nn.modules.",)

# Never admitted, even under a prefix: nested unpicklers that would ignore this allowlist.
DEFAULT_DENIED = frozenset(
    {
        "nnsight.intervention.serialization.load",
        "nnsight.intervention.serialization.loads",
        "nnsight.intervention.serialization.CustomCloudUnpickler",
    }
)

# Roots `cloudpickle.subimport` may import: the packages a block's global names typically refer
# to (`torch`, `F`, `np`, `einops`, `math`), all installed on every site, none with import-time
# effects beyond loading themselves.
DEFAULT_IMPORT_ROOTS = frozenset(
    {
        "torch",
        "math",
        "numpy",
        "einops",
        "nnsight",
        "collections",
        "functools",
        "operator",
        "itertools",
        "typing",
        "transformers",
    }
)

# `types.*` names `_builtin_type` may return: bound methods (a tracer's `fn`), the namespace a
# SerializedFrame keeps its code metadata in, read-only class dicts. CodeType and FunctionType
# are left out: they would rebuild bytecode, which also breaks across Python versions.
DEFAULT_BUILTIN_TYPES = frozenset({"MethodType", "SimpleNamespace", "MappingProxyType"})

# Attention implementations a request's env may select (`_remoteable_set_env`).
DEFAULT_ATTN_IMPLEMENTATIONS = frozenset({"eager", "sdpa"})

# A compressed payload's zstd header states its size, which decompression allocates up front;
# real payloads are kilobytes plus any tensors the user ships.
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30


@dataclass(frozen=True)
class PayloadPolicy:
    """What a site admits in a request: payload globals and `env` settings.

    The defaults accept every payload the unmodified nnsight 0.8.1 client produces for
    traces, sessions and generate on transformers models. A site extends it with
    `dataclasses.replace(policy, globals=policy.globals | {...})`.
    """

    globals: frozenset[str] = DEFAULT_GLOBALS
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    class_prefixes: tuple[str, ...] = DEFAULT_CLASS_PREFIXES
    denied: frozenset[str] = DEFAULT_DENIED
    import_roots: frozenset[str] = DEFAULT_IMPORT_ROOTS
    builtin_types: frozenset[str] = DEFAULT_BUILTIN_TYPES
    attn_implementations: frozenset[str] = DEFAULT_ATTN_IMPLEMENTATIONS
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

    def admits(self, module: str, name: str) -> bool:
        """Whether the global `module.name` may be resolved (before any lookup happens)."""
        full = f"{module}.{name}"
        if full in self.denied or any(part.startswith("__") for part in name.split(".")):
            return False
        return full in self.globals or _under(module, self.prefixes + self.class_prefixes)

    def admits_resolved(self, full: str, obj: Any) -> bool:
        """Whether `obj`, found for the admitted name `full`, may be returned."""
        if full in self.globals:
            return True
        if _canonical_name(obj) != full:
            return False
        return _under(obj.__module__, self.prefixes) or isinstance(obj, type)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(f"{module}.".startswith(prefix) for prefix in prefixes)


def _refuse(what: str) -> GlobalNotAllowed:
    return GlobalNotAllowed(f"global {what} is not allowed in a request payload")


class AllowlistUnpickler(CustomCloudUnpickler):
    """`CustomCloudUnpickler` that resolves only globals its `PayloadPolicy` admits.

    Use with `functools.partial(AllowlistUnpickler, policy=...)` (or the default policy) as
    the `unpickler` argument of `RequestModel.deserialize`. One instance per payload: it
    remembers the functions this payload rebuilt, the only ones `_fill` may populate.
    """

    def __init__(
        self,
        file: io.BufferedIOBase,
        persistent_objects: dict | None,
        policy: PayloadPolicy | None = None,
    ) -> None:
        super().__init__(file, persistent_objects)
        self.policy = policy or PayloadPolicy()
        # What this payload built; only these may be filled in afterwards.
        self._loaded_functions: set[int] = set()
        self._built_classes: set[int] = set()
        self._wrappers: dict[str, Callable[..., Any]] = {
            "cloudpickle.cloudpickle.subimport": self._subimport,
            "cloudpickle.cloudpickle._builtin_type": self._builtin_type,
            "torch.storage._load_from_bytes": _load_tensor_bytes,
            "nnsight.intervention.serialization._load_function": self._load_function,
            "nnsight.intervention.serialization._fill": self._fill,
            "cloudpickle.cloudpickle._make_skeleton_class": self._make_skeleton_class,
            "cloudpickle.cloudpickle._class_setstate": self._class_setstate,
        }

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if not self.policy.admits(module, name):
            raise _refuse(full)
        if full in self._wrappers:
            return self._wrappers[full]
        found = super().find_class(module, name)
        if not self.policy.admits_resolved(full, found):
            raise _refuse(full)
        return found

    def _subimport(self, name: str) -> Any:
        if name.split(".")[0] not in self.policy.import_roots:
            raise _refuse(f"module {name}")
        return cloudpickle_impl.subimport(name)

    def _builtin_type(self, name: str) -> Any:
        if name not in self.policy.builtin_types:
            raise _refuse(f"types.{name}")
        return cloudpickle_impl._builtin_type(name)

    def _load_function(self, *args: Any) -> Any:
        func = serialization._load_function(*args)
        self._loaded_functions.add(id(func))
        return func

    def _fill(self, func: Any, globals: dict) -> None:
        # Only a function this payload rebuilt: `_fill` on a site function would rewrite the
        # globals of a site module for every later request.
        if id(func) not in self._loaded_functions:
            raise PayloadRefused("the payload tried to change the globals of a site function")
        serialization._fill(func, globals)

    def _make_skeleton_class(self, *args: Any) -> Any:
        cls = cloudpickle_impl._make_skeleton_class(*args)
        self._built_classes.add(id(cls))
        return cls

    def _class_setstate(self, cls: Any, state: Any) -> Any:
        # Same reason as `_fill`: on an admitted site class it would monkeypatch it for good.
        if id(cls) not in self._built_classes:
            raise PayloadRefused("the payload tried to change the attributes of a site class")
        return cloudpickle_impl._class_setstate(cls, state)


def _canonical_name(obj: Any) -> str:
    """`module.qualname` of a class or function ('' for anything else, e.g. a module)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return ""


def _load_tensor_bytes(data: bytes) -> Any:
    # torch's own `_load_from_bytes` calls torch.load(weights_only=False): a nested,
    # unrestricted unpickler. A pickled storage needs nothing weights_only refuses.
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise PayloadRefused(f"a shipped tensor could not be loaded safely: {exc}") from exc
