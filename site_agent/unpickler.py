"""The restricted unpickler a site deserializes request payloads with.

`RequestModel.deserialize(..., unpickler=...)` builds `unpickler(file, persistent_objects)`
and calls `load()`. Pickle resolves every global through `find_class` *before* the opcode
that calls it, so refusing there means a gadget naming `posix.system` fails before anything
runs. `AllowlistUnpickler.find_class` admits only what legitimate nnsight 0.8.1 payloads need
(spec §9, §12), as listed in `PayloadPolicy`, and raises `GlobalNotAllowed` otherwise.

A few admitted globals are replaced by guarded wrappers, because the originals would reopen
the door the allowlist closes: `cloudpickle.subimport` (imports any module; now only what the
`SourcePolicy` admits), `torch.storage._load_from_bytes` (runs an unrestricted nested
`torch.load`), cloudpickle's `_builtin_type` (hands out any `types.*`, `CodeType` included),
nnsight's `_fill` (updates the globals of *any* function, e.g. a site module's) and
`_load_function` (compiles shipped source).

Shipped functions (spec §12 route 3): `_load_function` checks the source with
`check_source` before nnsight compiles it and rebuilds the function on globals whose
`__builtins__` are the policy's restricted builtins (`runtime_guard.py`, as for the block),
and `_fill` checks the globals it installs (and
the source again, now that its module names are known). Until `release()` the function's code
is an inert stand-in, so a crafted pickle cannot call it while it is still being unpickled,
before the rest of the payload was checked. `release()` then checks where the payload put
module objects (only as names of a namespace, where the source check sees them) and
restores the real code. A payload loaded without `release()` never runs shipped code.

This is defence in depth only: payloads legitimately carry source that the site compiles
(`_load_function`) and runs (the block itself). Isolation of the worker is the control.
"""

from __future__ import annotations

import gc
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FunctionType, ModuleType
from typing import Any

import cloudpickle.cloudpickle as cloudpickle_impl
import numpy as np
import torch
from nnsight.intervention import serialization
from nnsight.intervention.serialization import CustomCloudUnpickler

from edif.errors import GlobalNotAllowed, PayloadRefused
from site_agent.runtime_guard import builtins_dict
from site_agent.source_policy import (
    SourcePolicy,
    check_namespace,
    check_source,
    is_site_module,
    module_bindings,
)

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
        "cloudpickle.cloudpickle.subimport",  # wrapped: only modules the SourcePolicy admits
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
    `dataclasses.replace(policy, globals=policy.globals | {...})`. `source` is the policy for
    the code itself (the block and shipped functions), whose `import_roots` are also the only
    modules `cloudpickle.subimport` may import.
    """

    globals: frozenset[str] = DEFAULT_GLOBALS
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    class_prefixes: tuple[str, ...] = DEFAULT_CLASS_PREFIXES
    denied: frozenset[str] = DEFAULT_DENIED
    source: SourcePolicy = field(default_factory=SourcePolicy)
    builtin_types: frozenset[str] = DEFAULT_BUILTIN_TYPES
    attn_implementations: frozenset[str] = DEFAULT_ATTN_IMPLEMENTATIONS
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

    @property
    def import_roots(self) -> frozenset[str]:
        """The module roots a payload may name: one list, the source policy's."""
        return self.source.import_roots

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

    One instance per payload: it remembers the functions and classes this payload built, the
    only ones `_fill` and `_class_setstate` may populate. Call `load()`, check the block, then
    `release(loaded, namespaces)` before running anything the payload holds (module doc).
    """

    def __init__(
        self,
        file: io.BufferedIOBase,
        persistent_objects: dict | None,
        policy: PayloadPolicy | None = None,
    ) -> None:
        super().__init__(file, persistent_objects)
        self.policy = policy or PayloadPolicy()
        # What this payload built (kept alive, so an id cannot be reused by another object);
        # only these may be filled in afterwards.
        self._functions: dict[int, _ShippedFunction] = {}
        self._built_classes: dict[int, type] = {}
        # What find_class handed out: site objects, which the module scan does not enter.
        self._site_objects: dict[int, Any] = {}
        # The builtins every shipped function runs with (runtime_guard.py, layer 2).
        self._builtins = builtins_dict(self.policy.source)
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
        self._site_objects[id(found)] = found
        return found

    def _subimport(self, name: str) -> Any:
        if not isinstance(name, str) or not self.policy.source.admits_module(name):
            raise _refuse(f"module {name}")
        return cloudpickle_impl.subimport(name)

    def _builtin_type(self, name: str) -> Any:
        if name not in self.policy.builtin_types:
            raise _refuse(f"types.{name}")
        return cloudpickle_impl._builtin_type(name)

    def _load_function(
        self,
        source: Any,
        name: Any,
        defaults: Any,
        kwdefaults: Any,
        annotations: Any,
        origin_filename: Any,
        origin_line: Any,
    ) -> Any:
        if not (
            isinstance(source, str)
            and isinstance(name, str)
            and isinstance(origin_filename, str)
            and type(origin_line) is int
            and 1 <= origin_line <= _MAX_ORIGIN_LINE  # nnsight pads the source with this many
        ):
            raise PayloadRefused("a shipped function is not in the form nnsight ships functions")
        filename = f"[{name}:{origin_line}] {origin_filename}"  # as nnsight compiles it
        check_source(source, filename, self.policy.source, first_line=origin_line)
        built = serialization._load_function(
            source, name, defaults, kwdefaults, annotations, origin_filename, origin_line
        )
        # nnsight creates the function against the site's real builtins, and a function
        # takes its builtins from its globals once, when it is created: rebuild it on
        # globals holding the restricted ones (layer 2), as the block gets. Functions it
        # defines at run time inherit them from these globals.
        func = FunctionType(
            built.__code__, {"__builtins__": self._builtins}, name, built.__defaults__
        )
        func.__kwdefaults__ = built.__kwdefaults__
        func.__annotations__ = built.__annotations__
        self._functions[id(func)] = _ShippedFunction(
            func, func.__code__, source, filename, origin_line
        )
        func.__code__ = _INERT_CODE
        return func

    def _fill(self, func: Any, globals: Any) -> None:
        # Only a function this payload rebuilt: `_fill` on a site function would rewrite the
        # globals of a site module for every later request.
        shipped = self._functions.get(id(func))
        if shipped is None or shipped.func is not func:
            raise PayloadRefused("the payload tried to change the globals of a site function")
        if not isinstance(globals, dict):
            raise PayloadRefused("the globals of a shipped function are not a mapping")
        policy = self.policy.source
        check_namespace(globals, f"the globals of the shipped function {func.__name__!r}", policy)
        # The source was checked before its global names were known; which of them are
        # modules decides what `np.load` means, so check it again with them.
        bindings = module_bindings(func.__globals__, globals)
        if bindings:
            check_source(shipped.source, shipped.filename, policy, bindings, shipped.first_line)
        serialization._fill(func, globals)

    def _make_skeleton_class(self, *args: Any) -> Any:
        cls = cloudpickle_impl._make_skeleton_class(*args)
        self._built_classes[id(cls)] = cls
        return cls

    def _class_setstate(self, cls: Any, state: Any) -> Any:
        # Same reason as `_fill`: on an admitted site class it would monkeypatch it for good.
        if self._built_classes.get(id(cls)) is not cls:
            raise PayloadRefused("the payload tried to change the attributes of a site class")
        # A dunder in the class dict is a hook Python calls by itself (`__del__`,
        # `__getattr__`, `__init_subclass__`); the source check refuses defining them, and a
        # crafted class dict must not bring them under another function's name.
        attributes = state[0] if isinstance(state, tuple) and state else state
        if isinstance(attributes, dict):
            allowed = self.policy.source.dunder_allowlist | _CLASS_METADATA
            for key in attributes:
                if isinstance(key, str) and _is_dunder(key) and key not in allowed:
                    raise PayloadRefused(
                        f"a shipped class sets {key!r}, which is not allowed by site policy "
                        f"{self.policy.source.label}"
                    )
        return cloudpickle_impl._class_setstate(cls, state)

    def release(self, loaded: Any, namespaces: Sequence[dict]) -> None:
        """Check where the payload put modules, then make its shipped functions callable.

        `namespaces` are the dicts the code runs against (the block's globals and locals);
        with the shipped functions' globals and the dicts of modules the payload built, they
        are the only places a module may be, by name, where the source check sees its use.
        Anywhere else (`SimpleNamespace(np=numpy)`, a list, a class attribute) its use
        (`ns.np.load`) would be invisible to the check, so the payload is refused.
        """
        misplaced = self._misplaced_module(loaded, namespaces)
        if misplaced is not None:
            raise GlobalNotAllowed(
                f"the payload ships the module {misplaced!r} inside a value; a module may only "
                "be a name the code refers to (site policy "
                f"{self.policy.source.label})"
            )
        for shipped in self._functions.values():
            shipped.func.__code__ = shipped.code

    def _misplaced_module(self, loaded: Any, namespaces: Sequence[dict]) -> str | None:
        namespace_ids = {id(ns) for ns in namespaces}
        namespace_ids.update(id(s.func.__globals__) for s in self._functions.values())
        # Never entered (counted as seen from the start): what find_class handed out and the
        # model's persistent objects (site objects), and the restricted builtins every
        # shipped function's globals hold (the site's, put there by `_load_function`).
        seen = set(self._site_objects)
        seen.update(id(obj) for obj in (self.persistent_objects or {}).values())
        seen.add(id(self._builtins))
        policy = self.policy.source
        atomic = _ATOMIC
        pending: list[tuple[Any, bool]] = [(loaded, False)]  # (object, may it be a module)
        pop, extend = pending.pop, pending.extend
        while pending:
            obj, module_allowed = pop()
            if type(obj) in atomic:
                continue
            if isinstance(obj, ModuleType):
                if not module_allowed:
                    return getattr(obj, "__name__", "?")
                if is_site_module(obj):
                    if not policy.admits_module(obj.__name__):
                        return obj.__name__
                else:  # built by the payload (cloudpickle's by-value modules): a namespace
                    namespace_ids.add(id(vars(obj)))
                    pending.append((vars(obj), False))
                continue
            key = id(obj)
            if key in seen:
                continue
            seen.add(key)
            extend(self._contents(obj, key in namespace_ids))
        return None

    def _contents(self, obj: Any, is_namespace: bool) -> list[tuple[Any, bool]]:
        """What `obj` refers to, for the module scan; site functions and classes are opaque."""
        if isinstance(obj, dict):
            atomic = _ATOMIC
            found = [(k, False) for k in obj if type(k) not in atomic]
            found += [(v, is_namespace) for v in obj.values() if type(v) not in atomic]
            return found
        if isinstance(obj, FunctionType):
            if id(obj) not in self._functions:
                return []
            parts = (obj.__globals__, obj.__defaults__, obj.__kwdefaults__, obj.__dict__)
            return [(part, False) for part in (*parts, obj.__annotations__)]
        if isinstance(obj, type):
            if self._built_classes.get(id(obj)) is not obj:
                return []
            return [(value, False) for value in vars(obj).values()]
        if isinstance(obj, np.ndarray):
            return [(item, False) for item in obj.flat] if obj.dtype == object else []
        # Anything else: what the garbage collector sees it refer to (items, __dict__, slots,
        # a partial's function and arguments), without running any of its Python code.
        return [
            (ref, False)
            for ref in gc.get_referents(obj)
            if not isinstance(ref, type) or self._built_classes.get(id(ref)) is ref
        ]


@dataclass(frozen=True, eq=False)
class _ShippedFunction:
    func: FunctionType
    code: Any  # its real code object, restored by release()
    source: str
    filename: str
    first_line: int


def _inert(*args: Any, **kwargs: Any) -> Any:
    # Stands in for a shipped function's code until the payload is released. It runs against
    # the payload's globals, so it looks up no names at all: a dict lookup that fails.
    return {}["a shipped function was called while its payload was still being checked"]


_INERT_CODE = _inert.__code__
_MAX_ORIGIN_LINE = 1_000_000

# Dunders cloudpickle writes into a class dict besides the methods.
_CLASS_METADATA = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__annotations__",
        "__slots__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
    }
)

# Values that refer to nothing: the module scan skips them.
_ATOMIC = frozenset(
    {str, bytes, int, float, complex, bool, type(None), range, torch.dtype, torch.device}
)


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


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
