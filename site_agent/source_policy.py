"""The site's source policy: which Python a request may contain, checked before it compiles.

Role: an nnsight payload is code. The site compiles the block's source and every function the
client shipped by source (`_load_function`), then runs them. `check_source` is the first layer
of the sandbox: it parses a source with `ast` and refuses the constructs that reach outside
the computation (other modules, the filesystem, processes, code loading, frame and object
introspection) before `compile` ever sees the text. Isolation of the worker stays the control;
this layer makes the obvious routes fail early, with a message that names the construct, its
line and the policy, instead of running.

Flow of `check_source(source, filename, policy, bindings)`:
1. Parse. A syntax error or a source nested too deeply for the checker is refused.
2. Module references. Which names denote modules: the shipped namespace's module values
   (`bindings`), names bound by `import`, and names assigned from those (`t = torch`), found
   flow-insensitively, so an alias refers to a module wherever it is used.
3. Walk every node:
   - imports: only modules under `import_roots`, never a denied or private module path, no
     `from x import *`, no relative imports;
   - names: no `forbidden_calls` builtins (`eval`, `open`, ...), even as values (`print(open)`);
     `getattr`/`setattr`/`delattr`/`hasattr` only called directly with a constant,
     admitted attribute name; no dunder names outside `dunder_allowlist`;
   - attributes, on any object: no dunder outside `dunder_allowlist`, no
     `forbidden_attributes` (frame/code/generator introspection, loaders and savers, nnsight's
     tracer plumbing, hooks that would outlive the job); `str.format` only on a constant
     template whose fields read no such attribute;
   - attribute chains on a module are resolved on the site's real modules (`torch.os` is the
     module `os`): every module reached must be admitted, no path or prefix in `denied`
     (`torch.load`, `numpy.load`, `torch.utils.cpp_extension`, ...), no private member, only
     `public_members` of a restricted root (`nnsight.save`); no assignment or deletion into a
     module (monkeypatching the site for later jobs); a module used as a value other than as
     an alias (`f(torch)`, `[np]`) is refused, so every module use stays visible here;
   - class bodies: no dunder methods outside `dunder_allowlist` (`__del__`,
     `__init_subclass__`, `__getattr__`, ... would run code at times the user does not see);
     `type(name, bases, dict)` is refused for the same reason;
   - string constants (docstrings aside) naming a refused dunder or introspection attribute.

What it cannot see is where a value came from at run time; the namespace checks
(`check_namespace`) and the unpickler's scan for modules inside shipped values keep modules
to the places this check sees, and the worker's isolation covers everything else.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import re
import string
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from edif.errors import SourceRefused

# What a block imports or names as a module: the numerical stack interpretability code uses,
# and pure-Python standard helpers. `transformers` is not here: its loaders reach the Hub and
# the filesystem, and a block has the site's model already.
DEFAULT_IMPORT_ROOTS = frozenset(
    {
        "torch",
        "math",
        "numpy",
        "einops",
        "nnsight",
        "collections",
        "functools",
        "itertools",
        "operator",
        "typing",
    }
)

# Roots that expose only the members listed here. nnsight's package also holds its
# serialization (nested unrestricted unpicklers), the NDIF client (network), model loaders and
# `util.from_import_path` (imports anything); a block needs only `nnsight.save` and the types.
DEFAULT_PUBLIC_MEMBERS = frozenset(
    {"nnsight.save", "nnsight.Object", "nnsight.Envoy", "nnsight.NNsight"}
)

# Module paths and members refused with everything under them: files, code loading and
# compilation, processes, the network, and evaluation of strings as code.
DEFAULT_DENIED = frozenset(
    {
        # torch: (de)serialization and files
        "torch.load",
        "torch.save",
        "torch.serialization",
        "torch.storage",
        "torch.from_file",
        "torch.hub",
        "torch.package",
        "torch.onnx",
        "torch.profiler",
        "torch.autograd.profiler",
        # torch: native code, compilers and code generation
        "torch.ops.load_library",
        "torch.ops.import_module",
        "torch.classes",
        "torch.library",
        "torch.jit",
        "torch.compile",
        "torch.compiler",
        "torch.export",
        "torch.fx",
        "torch.cuda.jiterator",
        # torch: processes and the network; torch.utils holds cpp_extension, data loaders
        # (worker processes), benchmark (runs statement strings), model_zoo (downloads)
        "torch.utils",
        "torch.multiprocessing",
        "torch.distributed",
        # numpy: files, pickles, native code
        "numpy.load",
        "numpy.save",
        "numpy.savez",
        "numpy.savez_compressed",
        "numpy.savetxt",
        "numpy.loadtxt",
        "numpy.genfromtxt",
        "numpy.fromfile",
        "numpy.fromregex",
        "numpy.memmap",
        "numpy.DataSource",
        "numpy.lib.npyio",
        "numpy.lib.format",
        "numpy.lib._npyio_impl",
        "numpy.lib._datasource",
        "numpy.ctypeslib",
        "numpy.f2py",
        "numpy.distutils",
        "numpy.testing",
        # evaluation of strings as code (string annotations are eval'd)
        "typing.get_type_hints",
        "typing.ForwardRef",
        "typing.evaluate_forward_ref",
        "functools.singledispatch",
        "functools.singledispatchmethod",
        # attribute access by a string, out of this check's sight
        "operator.attrgetter",
        "operator.methodcaller",
    }
)

# Dunders a block may read, call or define: the protocols user classes implement and the
# harmless names. Everything else (`__class__`, `__bases__`, `__mro__`, `__subclasses__`,
# `__globals__`, `__builtins__`, `__dict__`, `__code__`, `__closure__`, `__reduce__`,
# `__getattribute__`, `__import__`, `__loader__`, `__spec__`, `__del__`, ...) is refused.
DEFAULT_DUNDER_ALLOWLIST = frozenset(
    {
        "__init__",
        "__call__",
        "__len__",
        "__getitem__",
        "__setitem__",
        "__delitem__",
        "__contains__",
        "__iter__",
        "__next__",
        "__enter__",
        "__exit__",
        "__repr__",
        "__str__",
        "__eq__",
        "__ne__",
        "__lt__",
        "__le__",
        "__gt__",
        "__ge__",
        "__hash__",
        "__bool__",
        "__name__",
        "__qualname__",
        "__doc__",
        "__version__",
        "__main__",
    }
)

# Builtins refused wherever they are named: they run strings as code, open files, read the
# scope or stdin, or start the debugger or pager.
DEFAULT_FORBIDDEN_CALLS = frozenset(
    {
        "exec",
        "eval",
        "compile",
        "open",
        "__import__",
        "globals",
        "locals",
        "vars",
        "breakpoint",
        "input",
        "help",
        "license",
    }
)

# Builtins that read or write an attribute named by a string: only called directly, with a
# constant name that passes the attribute rules (`getattr(model, "lm_head")`).
DEFAULT_CHECKED_CALLS = frozenset({"getattr", "setattr", "delattr", "hasattr"})

_INTROSPECTION = frozenset(
    {
        "f_globals",
        "f_locals",
        "f_builtins",
        "f_back",
        "f_code",
        "f_trace",
        "gi_frame",
        "gi_code",
        "gi_yieldfrom",
        "cr_frame",
        "cr_code",
        "cr_await",
        "cr_origin",
        "ag_frame",
        "ag_code",
        "ag_await",
        "tb_frame",
        "tb_next",
        "gr_frame",
        "co_code",
        "co_consts",
        "co_names",
        "co_varnames",
        "_getframe",
        "_current_frames",
    }
)

# Attribute names refused on any object, with the reason the message gives.
_ATTRIBUTE_REASONS = {
    **dict.fromkeys(_INTROSPECTION, "frame, code and generator introspection"),
    **dict.fromkeys(
        (
            "load_library",
            "import_module",
            "from_file",
            "fromfile",
            "tofile",
            "dump",
            "from_pretrained",
            "_from_pretrained",
            "save_pretrained",
            "_save_pretrained",
            "save_vocabulary",
            "push_to_hub",
            "from_json_file",
            "to_json_file",
            "from_model_key",
            "load_adapter",
            "_remoteable_set_env",
        ),
        "reads or writes files, loads code or models, or uses the network",
    ),
    # nnsight's tracer plumbing: `tracer.source(path)` reads any file, and parse/build/
    # compile/execute turn a string into running code; `info` holds the compiled block.
    **dict.fromkeys(
        ("info", "code", "parse", "build", "compile", "execute", "capture"),
        "compiles or runs code outside this check",
    ),
    # Hooks stay on the site's shared model after the job and would run in other users' jobs.
    **dict.fromkeys(
        (
            "register_forward_hook",
            "register_forward_pre_hook",
            "register_full_backward_hook",
            "register_full_backward_pre_hook",
            "register_backward_hook",
            "register_hook",
            "register_post_accumulate_grad_hook",
            "register_module_forward_hook",
            "register_module_forward_pre_hook",
            "register_module_full_backward_hook",
            "register_multi_grad_hook",
        ),
        "outlives the job on the site's shared model",
    ),
}
DEFAULT_FORBIDDEN_ATTRIBUTES = frozenset(_ATTRIBUTE_REASONS)

# Attribute names allowed only with a further attribute after them, and why.
_ONLY_FOLLOWED = {"source": "a tracer's .source(filename) reads files"}

_DENIED_REASON = "reaches files, code loading, processes or the network"
_DUNDER = re.compile(r"__\w+?__")


@dataclass(frozen=True)
class SourcePolicy:
    """What request code may contain; versioned, so a refusal says which rules applied.

    A site extends it with `dataclasses.replace(policy, name=..., version=...,
    import_roots=policy.import_roots | {...})`; change `name` or `version` with the rules.
    """

    name: str = "edif-default"
    version: int = 1
    import_roots: frozenset[str] = DEFAULT_IMPORT_ROOTS
    public_members: frozenset[str] = DEFAULT_PUBLIC_MEMBERS
    denied: frozenset[str] = DEFAULT_DENIED
    dunder_allowlist: frozenset[str] = DEFAULT_DUNDER_ALLOWLIST
    forbidden_calls: frozenset[str] = DEFAULT_FORBIDDEN_CALLS
    checked_calls: frozenset[str] = DEFAULT_CHECKED_CALLS
    forbidden_attributes: frozenset[str] = DEFAULT_FORBIDDEN_ATTRIBUTES

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def restricted_roots(self) -> frozenset[str]:
        """Roots whose members are limited to `public_members`."""
        return frozenset(member.split(".")[0] for member in self.public_members)

    def denies(self, path: str) -> bool:
        """Whether the dotted `path` is, or lies under, a denied path."""
        parts = path.split(".")
        return any(".".join(parts[:i]) in self.denied for i in range(1, len(parts) + 1))

    def admits_module(self, name: str) -> bool:
        """Whether the module `name` may be imported or named (also `cloudpickle.subimport`)."""
        parts = name.split(".")
        if parts[0] not in self.import_roots or self.denies(name):
            return False
        if any(part.startswith("_") for part in parts):
            return False
        return parts[0] not in self.restricted_roots or len(parts) == 1

    def allowed_imports(self) -> str:
        """The roots, as the refusal message lists them."""
        shown = []
        for root in sorted(self.import_roots):
            members = sorted(
                m.split(".", 1)[1] for m in self.public_members if m.startswith(f"{root}.")
            )
            shown.append(f"{root} ({', '.join(members)} only)" if members else root)
        return ", ".join(shown)

    def describe(self) -> dict[str, Any]:
        """The policy as plain data, for the agent's Describe and for operators."""
        return {
            "name": self.name,
            "version": self.version,
            "import_roots": sorted(self.import_roots),
            "public_members": sorted(self.public_members),
            "denied": sorted(self.denied),
            "dunder_allowlist": sorted(self.dunder_allowlist),
            "forbidden_calls": sorted(self.forbidden_calls),
            "checked_calls": sorted(self.checked_calls),
            "forbidden_attributes": sorted(self.forbidden_attributes),
        }


def check_source(
    source: str,
    filename: str,
    policy: SourcePolicy,
    bindings: Mapping[str, ModuleType] | None = None,
    first_line: int = 1,
) -> None:
    """Refuse `source` with `SourceRefused` if it breaks `policy`; see the module doc.

    `bindings` are the module values of the namespace the code will run against (for the
    block: its shipped globals and locals); `first_line` is the line of the file the source
    starts at, so messages name the user's line.

    Verdicts are cached (`_VERDICTS`): a researcher resends the same code, and the check is a
    function of its inputs only. The key is the policy itself (every rule, not just its
    label), the source's SHA-256, filename and first line (which the message names), the
    bindings as names of the site's modules (bindings to modules a payload built are never
    cached: what their attributes resolve to is payload data), and the number of loaded
    modules (what an attribute chain on a site module resolves to can change when a module
    is imported lazily).
    """
    key = _verdict_key(source, filename, policy, bindings, first_line)
    if key is not None:
        refusal = _VERDICTS.get(key, _MISSING)
        if refusal is None:
            return
        if refusal is not _MISSING:
            raise SourceRefused(*refusal)
    try:
        _check_source(source, filename, policy, bindings, first_line)
    except SourceRefused as exc:
        _remember(key, (exc.message, exc.lineno))
        raise
    _remember(key, None)


_VERDICTS: dict[tuple, tuple[str, int | None] | None] = {}
_MAX_VERDICTS = 4096


def _verdict_key(
    source: str,
    filename: str,
    policy: SourcePolicy,
    bindings: Mapping[str, ModuleType] | None,
    first_line: int,
) -> tuple | None:
    named = []
    for name, module in (bindings or {}).items():
        if not is_site_module(module):
            return None
        named.append((name, module.__name__))
    digest = hashlib.sha256(source.encode("utf-8", "surrogatepass")).digest()
    return (policy, digest, filename, first_line, tuple(sorted(named)), len(sys.modules))


def _remember(key: tuple | None, verdict: tuple[str, int | None] | None) -> None:
    if key is None:
        return
    if len(_VERDICTS) >= _MAX_VERDICTS:  # bounded: drop the oldest entry
        del _VERDICTS[next(iter(_VERDICTS))]
    _VERDICTS[key] = verdict


def _check_source(
    source: str,
    filename: str,
    policy: SourcePolicy,
    bindings: Mapping[str, ModuleType] | None,
    first_line: int,
) -> None:
    offset = first_line - 1
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        line = (exc.lineno or 1) + offset
        raise _refused(policy, line, filename, f"source that does not parse ({exc.msg})") from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise _refused(
            policy, first_line, filename, f"source that cannot be parsed ({exc})"
        ) from None
    checker = _Checker(policy, filename, offset, bindings or {})
    try:
        checker.run(tree)
    except RecursionError:
        raise _refused(policy, first_line, filename, "source nested this deeply") from None


def check_namespace(namespace: Mapping[Any, Any], where: str, policy: SourcePolicy) -> None:
    """Refuse a shipped namespace (globals or locals) that would change what names mean.

    Keys must be identifiers and no dunder outside the allowlist (but a method's `__class__`):
    `__builtins__` in a namespace replaces the builtins the code runs with, so `print` could
    be anything, and `__loader__` is what tracebacks and warnings read source through. Module
    values must be admitted modules (or modules the payload built from shipped values).
    """
    for key, value in namespace.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise SourceRefused(
                f"{where} holds the key {key!r}, which is not a name ({_by(policy)})"
            )
        # nnsight folds a method's `super()` cell into its globals as `__class__`; the code
        # cannot name it, and it is no hook Python reads from globals, unlike `__builtins__`.
        shipped_cell = key == "__class__" and isinstance(value, type)
        if _is_dunder(key) and key not in policy.dunder_allowlist and not shipped_cell:
            raise SourceRefused(f"{where} sets {key!r}, which is not allowed by {_by(policy)}")
        site_module = isinstance(value, ModuleType) and is_site_module(value)
        if site_module and not policy.admits_module(value.__name__):
            raise SourceRefused(
                f"{where} holds the module {value.__name__!r} (as {key!r}), which is not "
                f"allowed by {_by(policy)}; allowed imports: {policy.allowed_imports()}"
            )


def module_bindings(*namespaces: Mapping[Any, Any]) -> dict[str, ModuleType]:
    """The names bound to modules in `namespaces`; a later namespace wins (locals last)."""
    found: dict[str, ModuleType] = {}
    for namespace in namespaces:
        for key, value in namespace.items():
            if isinstance(key, str):
                if isinstance(value, ModuleType):
                    found[key] = value
                else:
                    found.pop(key, None)
    return found


def is_site_module(module: ModuleType) -> bool:
    """Whether `module` is the site's imported module of that name, not one a payload built."""
    name = getattr(module, "__name__", None)
    return isinstance(name, str) and sys.modules.get(name) is module


# --- the checker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    """What a name or attribute chain denotes, as far as the check can tell."""

    obj: Any  # the module or member, or None where it is unknown here
    path: str | None  # its dotted path on the site; None inside a payload-built module
    is_module: bool


_MISSING = object()


def _refused(
    policy: SourcePolicy, line: int, filename: str, what: str, hint: str = ""
) -> SourceRefused:
    return SourceRefused(
        f"line {line}: {what} is not allowed by {_by(policy)}{hint} [{filename}]", line
    )


def _by(policy: SourcePolicy) -> str:
    return f"site policy {policy.label}"


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


class _Checker(ast.NodeVisitor):
    """One walk over one parsed source; raises at the first refused construct."""

    def __init__(
        self, policy: SourcePolicy, filename: str, offset: int, bindings: Mapping[str, ModuleType]
    ) -> None:
        self.policy = policy
        self.filename = filename
        self.offset = offset
        self.refs: dict[str, list[_Ref]] = {name: [_module_ref(m)] for name, m in bindings.items()}
        self.module_value_ok: set[int] = set()  # nodes where a module may be a value
        self.scopes: list[frozenset[str]] = []  # names local to enclosing functions

    def run(self, tree: ast.AST) -> None:
        self.index = _Index(tree)
        self._collect_aliases(self.index)
        self.visit(tree)

    _dispatch: dict[type, Callable[..., None]] = {}  # node type -> visitor, shared

    def visit(self, node: ast.AST) -> None:
        # ast.NodeVisitor.visit, with the method lookup cached per node type.
        kind = type(node)
        method = self._dispatch.get(kind)
        if method is None:
            method = getattr(type(self), f"visit_{kind.__name__}", _Checker.generic_visit)
            self._dispatch[kind] = method
        method(self, node)

    def generic_visit(self, node: ast.AST) -> None:
        for child in _children(node):
            self.visit(child)

    def refuse(self, node: ast.AST, what: str, hint: str = "") -> SourceRefused:
        line = getattr(node, "lineno", 1) + self.offset
        return _refused(self.policy, line, self.filename, what, hint)

    # -- module references ------------------------------------------------------------------

    def _collect_aliases(self, index: _Index) -> None:
        for node in index.imports:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if self.policy.admits_module(alias.name):
                        path = alias.name if alias.asname else alias.name.split(".")[0]
                        self._bind(alias.asname or path, _import_ref(path))
            elif node.module and not node.level and self.policy.admits_module(node.module):
                base = _import_ref(node.module)
                for alias in node.names:
                    ref = self._quiet(self._member, base, alias.name, node)
                    if alias.name != "*" and ref is not None and ref.is_module:
                        self._bind(alias.asname or alias.name, ref)
        # Flow-insensitive: a name that is ever a module is that module everywhere, besides
        # whatever else it is. Repeat until no alias adds another (`a = torch; b = a`).
        changed = True
        while changed:
            changed = False
            for names, value in index.assignments:
                refs = [r for r in self._quiet(self._chain_refs, value) or () if r.is_module]
                if refs:
                    self.module_value_ok.add(id(value))
                for name, ref in ((n, r) for n in names for r in refs):
                    changed |= self._bind(name, ref)

    def _bind(self, name: str, ref: _Ref) -> bool:
        known = self.refs.setdefault(name, [])
        if any(r.obj is ref.obj and r.path == ref.path for r in known):
            return False
        known.append(ref)
        return True

    @staticmethod
    def _quiet(resolve: Callable[..., Any], *args: Any) -> Any:
        # While collecting, a refused chain is left for the walk, which reports it in order.
        try:
            return resolve(*args)
        except SourceRefused:
            return None

    def _chain_refs(self, node: ast.expr) -> list[_Ref]:
        """What a Name/Attribute chain rooted at a module name denotes, one entry per module
        the name may be (empty: not rooted at a module name). Refuses a refused member."""
        segments: list[ast.Attribute] = []
        while isinstance(node, ast.Attribute):
            segments.append(node)
            node = node.value
        if not isinstance(node, ast.Name):
            return []
        found = []
        for ref in self.refs.get(node.id, ()):
            for attribute in reversed(segments):
                ref = self._member(ref, attribute.attr, attribute)
            found.append(ref)
        return found

    def _member(self, ref: _Ref, attr: str, node: ast.AST) -> _Ref:
        """`ref.attr`, checked: resolved on the site's real modules where it can be."""
        policy = self.policy
        path = f"{ref.path}.{attr}" if ref.path is not None else None
        if not ref.is_module:
            # Past a non-module (torch.ops): only the spelled path can still be denied.
            if path is not None and policy.denies(path):
                raise self.refuse(node, f"{path!r}", f" ({_DENIED_REASON})")
            return _Ref(None, path, False)
        if path is not None:
            if attr.startswith("_") and not _is_dunder(attr):
                raise self.refuse(node, f"the private module member {path!r}")
            root = path.split(".")[0]
            if (
                root in policy.restricted_roots
                and ref.path == root
                and path not in policy.public_members
            ):
                raise self.refuse(
                    node, f"{path!r}", f"; allowed imports: {policy.allowed_imports()}"
                )
            if policy.denies(path):
                raise self.refuse(node, f"{path!r}", f" ({_DENIED_REASON})")
        value = vars(ref.obj).get(attr, _MISSING) if ref.obj is not None else _MISSING
        if value is _MISSING and path is not None:
            value = _submodule(path)
        if isinstance(value, ModuleType):
            reached = _module_ref(value)
            if reached.path is not None and not policy.admits_module(reached.path):
                shown = path or attr
                raise self.refuse(
                    node,
                    f"{shown!r}, which is the module {reached.path!r},",
                    f"; allowed imports: {policy.allowed_imports()}",
                )
            return reached
        if value is _MISSING:
            if (
                path is not None
                and attr in sys.stdlib_module_names
                and attr not in policy.import_roots
            ):
                raise self.refuse(node, f"{path!r}, which may be the module {attr!r},")
            return _Ref(None, path, False)
        canonical = _canonical_name(value)
        if canonical and policy.denies(canonical):
            raise self.refuse(node, f"{path or attr!r} ({canonical})", f" ({_DENIED_REASON})")
        return _Ref(value, path, False)

    # -- visitors ---------------------------------------------------------------------------

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._check_binding(node, node.name)
        for keyword in node.keywords:
            if keyword.arg == "metaclass":
                raise self.refuse(keyword, "a metaclass")
        self.generic_visit(node)

    def _check_import_place(self, node: ast.Import | ast.ImportFrom) -> None:
        # In a class body an import binds a class attribute (`A.t`), a module no name reaches.
        if id(node) in self.index.class_level_imports:
            raise self.refuse(node, "an import in a class body", " (import at the top)")

    def visit_Import(self, node: ast.Import) -> None:
        self._check_import_place(node)
        for alias in node.names:
            self._check_import(node, alias.name)
            self._check_binding(node, alias.asname)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._check_import_place(node)
        if node.level:
            raise self.refuse(node, "a relative import")
        module = node.module or ""
        self._check_import(node, module)
        base = _import_ref(module)
        for alias in node.names:
            if alias.name == "*":
                raise self.refuse(node, f"'from {module} import *'", " (import names one by one)")
            self._check_binding(node, alias.asname or alias.name)
            self._member(base, alias.name, node)

    def _check_import(self, node: ast.AST, name: str) -> None:
        if not self.policy.admits_module(name):
            reason = f" ({_DENIED_REASON})" if self.policy.denies(name) else ""
            raise self.refuse(
                node,
                f"import of {name!r}",
                f"{reason}; allowed imports: {self.policy.allowed_imports()}",
            )

    def _check_binding(self, node: ast.AST, name: str | None) -> None:
        """A name the code binds (def, class, argument, alias, except, global, pattern)."""
        if name is not None and _is_dunder(name) and name not in self.policy.dunder_allowlist:
            raise self.refuse(node, f"the name {name!r}")

    def visit_Name(self, node: ast.Name) -> None:
        name = node.id
        if isinstance(node.ctx, ast.Load) and not self._is_local(name):
            if name in self.policy.forbidden_calls:
                raise self.refuse(node, f"the builtin {name!r}")
            if name in self.policy.checked_calls:
                raise self.refuse(
                    node, f"{name!r} other than called with a constant attribute name"
                )
        if _is_dunder(name) and name not in self.policy.dunder_allowlist:
            raise self.refuse(node, f"the name {name!r}")
        if (
            isinstance(node.ctx, ast.Load)
            and any(ref.is_module for ref in self.refs.get(name, ()))
            and id(node) not in self.module_value_ok
        ):
            raise self.refuse(
                node,
                f"using the module {name!r} as a value",
                " (use its attributes, or import what you need)",
            )

    def visit_Attribute(self, node: ast.Attribute) -> None:
        # Called on the outermost attribute of a chain; the whole chain is handled here.
        chain: list[ast.Attribute] = []
        current: ast.expr = node
        while isinstance(current, ast.Attribute):
            chain.append(current)
            current = current.value
        if isinstance(current, ast.Name):
            self._check_root_name(current)
        else:
            self.visit(current)
        refs = self._chain_refs(node)  # first: a denied module path is the clearer message
        for attribute in reversed(chain):
            self._check_attribute(attribute, attribute.attr, attribute.value)
        self._check_outermost(node, node.attr)
        if not refs:
            return
        if not isinstance(node.ctx, ast.Load):
            raise self.refuse(
                node, f"assigning or deleting {_unparse(node)!r} (a module attribute)"
            )
        if any(ref.is_module for ref in refs) and id(node) not in self.module_value_ok:
            raise self.refuse(
                node,
                f"using the module {_unparse(node)!r} as a value",
                " (use its attributes, or import what you need)",
            )

    def _is_module_chain(self, node: ast.expr | None) -> bool:
        if node is None:
            return False
        return any(ref.is_module for ref in self._quiet(self._chain_refs, node) or ())

    def _check_outermost(self, node: ast.AST, attr: str) -> None:
        # `envoy.source.<operation>` is nnsight's API for a module's inner operations; the
        # same name on a tracer is `Tracer.source(filename)`, which reads any file. Only the
        # first is ever followed by another attribute.
        if attr in _ONLY_FOLLOWED:
            raise self.refuse(
                node,
                f"'.{attr}' other than as '.{attr}.<operation>'",
                f" ({_ONLY_FOLLOWED[attr]})",
            )

    def _check_root_name(self, node: ast.Name) -> None:
        name = node.id
        forbidden = self.policy.forbidden_calls | self.policy.checked_calls
        if name in forbidden and not self._is_local(name):
            raise self.refuse(node, f"the builtin {name!r}")
        if _is_dunder(name) and name not in self.policy.dunder_allowlist:
            raise self.refuse(node, f"the name {name!r}")

    def _is_local(self, name: str) -> bool:
        """Whether `name` is bound in an enclosing function or comprehension, so it cannot be
        the builtin. Module and class level never count: there a read falls back to the
        builtins whenever the binding has not happened yet (or was deleted)."""
        return any(name in scope for scope in self.scopes)

    def _check_attribute(self, node: ast.AST, attr: str, receiver: ast.expr | None) -> None:
        policy = self.policy
        if _is_dunder(attr) and attr not in policy.dunder_allowlist:
            raise self.refuse(node, f"the attribute {attr!r}")
        if attr in policy.forbidden_attributes:
            reason = _ATTRIBUTE_REASONS.get(attr)
            raise self.refuse(node, f"the attribute {attr!r}", f" ({reason})" if reason else "")
        if attr in ("format", "format_map") and not self._is_module_chain(receiver):
            if not (isinstance(receiver, ast.Constant) and isinstance(receiver.value, str)):
                raise self.refuse(node, f"'.{attr}' on anything but a constant string")
            for field_attr in _format_attributes(receiver.value):
                self._check_attribute(node, field_attr, None)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            isinstance(func, ast.Name)
            and func.id in self.policy.checked_calls
            and not self._is_local(func.id)
        ):
            self._check_attribute_call(node, func.id)
        elif (
            isinstance(func, ast.Name)
            and func.id == "type"
            and len(node.args) + len(node.keywords) > 1
        ):
            raise self.refuse(
                node, "'type' with more than one argument", " (use a class statement)"
            )
        else:
            self.visit(func)
            for arg in node.args:
                self.visit(arg)
        for keyword in node.keywords:
            if keyword.arg is not None:
                self._check_keyword(keyword)
            self.visit(keyword.value)

    def _check_keyword(self, keyword: ast.keyword) -> None:
        name = keyword.arg or ""
        if name.startswith("co_") or (
            _is_dunder(name) and name not in self.policy.dunder_allowlist
        ):
            raise self.refuse(keyword, f"the keyword argument {name!r}")

    def _check_attribute_call(self, node: ast.Call, func: str) -> None:
        args = node.args
        if (
            len(args) < 2
            or node.keywords
            or any(isinstance(arg, ast.Starred) for arg in args)
            or not isinstance(args[1], ast.Constant)
            or not isinstance(args[1].value, str)
        ):
            raise self.refuse(
                node, f"{func}() with an attribute name that is not a constant string"
            )
        attr = args[1].value
        if not attr.isidentifier():
            raise self.refuse(node, f"{func}() with the attribute name {attr!r}")
        self._check_attribute(node, attr, args[0])
        self._check_outermost(node, attr)
        # getattr(torch, "load") is torch.load: the same chain rules apply.
        synthetic = ast.Attribute(value=args[0], attr=attr, ctx=ast.Load())
        ast.copy_location(synthetic, node)
        refs = self._chain_refs(synthetic)
        if refs and func in ("setattr", "delattr"):
            raise self.refuse(node, f"{func}() on a module")
        if any(ref.is_module for ref in refs):
            raise self.refuse(node, f"{func}() that returns a module")
        self.module_value_ok.add(id(args[0]))  # the chain was checked as one just above
        for arg in args:
            self.visit(arg)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._check_binding(node, node.name)
        # Decorators, defaults and annotations are evaluated where the def stands.
        for decorator in node.decorator_list:
            self.visit(decorator)
        self._visit_arguments(node.args)
        if node.returns is not None:
            self.visit(node.returns)
        self.scopes.append(self.index.locals[id(node)])
        for statement in node.body:
            self.visit(statement)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815 - the NodeVisitor naming

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_arguments(node.args)
        self.scopes.append(self.index.locals[id(node)])
        self.visit(node.body)
        self.scopes.pop()

    def _visit_arguments(self, args: ast.arguments) -> None:
        for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
            if arg is not None:
                self._check_binding(arg, arg.arg)
                if arg.annotation is not None:
                    self.visit(arg.annotation)
        for default in (*args.defaults, *args.kw_defaults):
            if default is not None:
                self.visit(default)

    def _visit_comprehension(self, node: ast.AST, elements: list[ast.expr]) -> None:
        generators: list[ast.comprehension] = node.generators  # type: ignore[attr-defined]
        self.visit(generators[0].iter)  # the first iterable is evaluated outside
        bound = {n.id for g in generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        self.scopes.append(frozenset(bound))
        for index, generator in enumerate(generators):
            self.visit(generator.target)
            if index:
                self.visit(generator.iter)
            for condition in generator.ifs:
                self.visit(condition)
        for element in elements:
            self.visit(element)
        self.scopes.pop()

    def visit_ListComp(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp) -> None:
        self._visit_comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp  # noqa: N815 - the NodeVisitor naming

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._visit_comprehension(node, [node.key, node.value])

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self._check_binding(node, node.name)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global | ast.Nonlocal) -> None:
        for name in node.names:
            self._check_binding(node, name)

    visit_Nonlocal = visit_Global  # noqa: N815 - the NodeVisitor naming

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        self._check_binding(node, node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        self._check_binding(node, node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        self._check_binding(node, node.rest)
        self.generic_visit(node)

    def visit_MatchClass(self, node: ast.MatchClass) -> None:
        # `case C(attr=...)` reads `subject.attr`.
        for attr in node.kwd_attrs:
            self._check_attribute(node, attr, None)
        self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # a docstring or a bare string: never evaluated into anything
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            for match in _strings_named(node.value):
                if match not in self.policy.dunder_allowlist:
                    raise self.refuse(node, f"a string naming {match!r}")


# --- helpers -------------------------------------------------------------------------------


def _module_ref(module: ModuleType) -> _Ref:
    if is_site_module(module):
        return _Ref(module, module.__name__, True)
    return _Ref(module, None, True)  # built by the payload from shipped values


def _import_ref(path: str) -> _Ref:
    """The module an (admitted) import statement names, imported if it is not yet.

    Importing an admitted module here is what the code itself would do a moment later; it
    lets the check see the module's real members (`torch.os`), not guess from names.
    """
    module = _submodule(path)
    if isinstance(module, ModuleType):
        return _module_ref(module)
    return _Ref(None, path, True)


def _submodule(path: str) -> Any:
    module = sys.modules.get(path)
    if module is not None:
        return module
    try:
        if importlib.util.find_spec(path) is None:
            return _MISSING
        return importlib.import_module(path)
    except Exception:  # not a module (torch.load), or one that fails to import here
        return _MISSING


def _canonical_name(value: Any) -> str:
    try:
        module = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", None)
    except Exception:  # a payload object whose attribute lookup is not plain
        return ""
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return ""


class _Index:
    """One pass over the tree before the walk: what the walk needs to know in advance.

    - `imports` and `assignments` outside class bodies, from which module aliases are found
      (in a class body a binding is a class attribute, `A.t`, which no name reaches, so a
      module assigned there stays a module used as a value, and is refused);
    - `locals`, for each function and lambda, the names local to it: its parameters and
      whatever its body binds. Python decides this at compile time for the whole body, so
      such a name never reads the builtin of that name (a read before the binding is an
      UnboundLocalError). Comprehension targets belong to the comprehension (the walk gives
      it its own scope); a `:=` in one binds in the enclosing function.
    """

    def __init__(self, tree: ast.AST) -> None:
        self.imports: list[ast.Import | ast.ImportFrom] = []
        self.class_level_imports: set[int] = set()
        self.assignments: list[tuple[list[str], ast.expr]] = []
        self.locals: dict[int, frozenset[str]] = {}
        self._scan(tree, None, in_class=False, in_comprehension=False)

    def _scan(
        self, node: ast.AST, scope: _Scope | None, in_class: bool, in_comprehension: bool
    ) -> None:
        if type(node) not in _BINDING_NODES:  # most nodes: just look inside
            for child in _children(node):
                self._scan(child, scope, in_class, in_comprehension)
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            if scope is not None and not isinstance(node, ast.Lambda):
                scope.names.add(node.name)
            inner = _Scope(_parameters(node.args))
            body = {id(n) for n in node.body} if isinstance(node.body, list) else {id(node.body)}
            for child in _children(node):
                if id(child) in body:
                    self._scan(child, inner, in_class=False, in_comprehension=False)
                else:  # decorators, defaults, annotations: evaluated where the def stands
                    self._scan(child, scope, in_class, in_comprehension)
            self.locals[id(node)] = frozenset(inner.names - inner.declared_global)
            return
        if isinstance(node, ast.ClassDef):
            if scope is not None:
                scope.names.add(node.name)
            body = {id(n) for n in node.body}
            for child in _children(node):
                in_body = id(child) in body
                self._scan(child, None if in_body else scope, in_body or in_class, False)
            return
        if isinstance(node, ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp):
            in_comprehension = True
        if isinstance(node, ast.Name):
            if scope is not None and not in_comprehension and not isinstance(node.ctx, ast.Load):
                scope.names.add(node.id)
        elif isinstance(node, ast.NamedExpr) and isinstance(node.target, ast.Name):
            if scope is not None:
                scope.names.add(node.target.id)
            if not in_class:
                self.assignments.append(([node.target.id], node.value))
        elif isinstance(node, ast.Global) and scope is not None:
            scope.declared_global.update(node.names)
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar):
            if scope is not None and node.name:
                scope.names.add(node.name)
        elif isinstance(node, ast.MatchMapping):
            if scope is not None and node.rest:
                scope.names.add(node.rest)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            if scope is not None:
                scope.names.update(a.asname or a.name.split(".")[0] for a in node.names)
            if in_class:
                self.class_level_imports.add(id(node))
            else:
                self.imports.append(node)
        elif isinstance(node, ast.Assign) and not in_class:
            if all(isinstance(target, ast.Name) for target in node.targets):
                self.assignments.append(([t.id for t in node.targets], node.value))  # type: ignore[attr-defined]
        elif (
            isinstance(node, ast.AnnAssign)
            and not in_class
            and isinstance(node.target, ast.Name)
            and node.value is not None
        ):
            self.assignments.append(([node.target.id], node.value))
        for child in _children(node):
            self._scan(child, scope, in_class, in_comprehension)


_BINDING_NODES = frozenset(
    {
        ast.FunctionDef,
        ast.AsyncFunctionDef,
        ast.Lambda,
        ast.ClassDef,
        ast.ListComp,
        ast.SetComp,
        ast.GeneratorExp,
        ast.DictComp,
        ast.Name,
        ast.NamedExpr,
        ast.Global,
        ast.ExceptHandler,
        ast.MatchAs,
        ast.MatchStar,
        ast.MatchMapping,
        ast.Import,
        ast.ImportFrom,
        ast.Assign,
        ast.AnnAssign,
    }
)


class _Scope:
    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.declared_global: set[str] = set()


def _parameters(args: ast.arguments) -> set[str]:
    every = (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg)
    return {arg.arg for arg in every if arg is not None}


def _children(node: ast.AST) -> Iterator[ast.AST]:
    # ast.iter_child_nodes, less the expression contexts (Load, Store): this runs for every
    # node twice, and the contexts are a third of all nodes.
    for field in node._fields:
        if field == "ctx":
            continue
        value = getattr(node, field, None)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, ast.AST):
                    yield item
        elif isinstance(value, ast.AST):
            yield value


def _format_attributes(template: str) -> Iterator[str]:
    """The attribute names the fields of a `str.format` template read (`{0.attr}`)."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError:
        return
    for _, field, spec, _ in fields:
        if field:
            yield from re.findall(r"\.([^.\[\]]*)", field)
            yield from (k for k in re.findall(r"\[([^\]]*)\]", field) if _is_dunder(k))
        if spec:
            yield from _format_attributes(spec)


def _strings_named(text: str) -> Iterator[str]:
    """Refusable names spelled out in a string: dunders and introspection attributes."""
    yield from _DUNDER.findall(text)
    if text in _INTROSPECTION:
        yield text


def _unparse(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except Exception:
        return "?"
