"""A site's own code policy: the `sandbox.policy` section of its YAML, built into a SourcePolicy.

Role: every site starts from `edif-default` v1 (`source_policy.py`) and may widen or narrow
two allowlists, under a name and version of its own that `Describe` publishes and every
refusal names (`site policy <name> v<version>`):

    sandbox:
      policy:
        name: fau-research     # required once any rule differs from the default
        version: 2             # bump it whenever the rules change
        allow_imports: [scipy] # extra top-level modules a block may import
        deny_imports: [einops, torch.linalg]  # roots removed, or dotted paths refused
        allow_dunders: [__add__, __matmul__]  # extra dunders code may read, call or define
        deny_dunders: [__call__]

Flow: `PolicyConfig` validates the section once, when the site config loads (a bad entry is a
`ConfigError` at start, never a request-time surprise); `build_source_policy` is a pure
function from it to the `SourcePolicy` the worker checks and runs code under (layers 1 and 2)
and `Describe` shows.

What a site cannot allow, whatever its YAML says: the modules and dunders that are the
sandbox's own escape routes (`os`, `sys`, `subprocess`, `ctypes`, `importlib`, `pickle`, the
agent's own packages, ...; `__class__`, `__globals__`, `__builtins__`, `__subclasses__`,
`__dict__`, ...). Those are refused at load with the reason, so a typo cannot open the site.
"""

from __future__ import annotations

import dataclasses
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from site_agent.source_policy import SourcePolicy

DEFAULT_NAME = "edif-default"

# Modules no site policy may admit: processes, files, the network, code loading, the
# interpreter's internals, and the site's own code (the agent, broker and their keys).
NEVER_IMPORTS = frozenset(
    {
        "os", "posix", "nt", "sys", "subprocess", "socket", "ssl", "select", "selectors",
        "ctypes", "cffi", "importlib", "pkgutil", "zipimport", "runpy", "site", "sysconfig",
        "builtins", "pickle", "marshal", "shelve", "dill", "cloudpickle", "copyreg", "io",
        "pathlib", "shutil", "tempfile", "glob", "fcntl", "mmap", "resource", "pty", "tty",
        "signal", "threading", "_thread", "multiprocessing", "concurrent", "asyncio", "gc",
        "inspect", "types", "code", "codeop", "ast", "dis", "traceback", "faulthandler",
        "atexit", "weakref", "http", "urllib", "requests", "httpx", "grpc", "ftplib",
        "smtplib", "socketserver", "xmlrpc", "webbrowser", "sqlite3", "dbm", "ray",
        "transformers", "huggingface_hub", "safetensors", "accelerate", "edif",
        "site_agent", "broker", "auth", "registry", "proto",
    }
)  # fmt: skip

# Dunders no site policy may admit: object-graph and frame introspection, the namespaces a
# function or module runs against, import machinery, and hooks Python calls by itself.
NEVER_DUNDERS = frozenset(
    {
        "__class__", "__base__", "__bases__", "__mro__", "__subclasses__", "__globals__",
        "__builtins__", "__dict__", "__code__", "__closure__", "__func__", "__self__",
        "__defaults__", "__kwdefaults__", "__import__", "__loader__", "__spec__", "__path__",
        "__file__", "__cached__", "__getattribute__", "__getattr__", "__setattr__",
        "__delattr__", "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__",
        "__del__", "__new__", "__init_subclass__", "__class_getitem__", "__set_name__",
        "__subclasshook__", "__instancecheck__", "__subclasscheck__", "__traceback__",
        "__context__", "__cause__", "__wrapped__", "__objclass__", "__weakref__",
        "__module__", "__annotations__", "__signature__", "__text_signature__",
    }
)  # fmt: skip

_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_DUNDER = re.compile(r"^__[A-Za-z0-9]\w*__$")


class PolicyConfig(BaseModel):
    """The `sandbox.policy` section of a site YAML (see module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default=DEFAULT_NAME, pattern=_NAME)
    version: int = Field(default=1, ge=1)
    allow_imports: tuple[str, ...] = ()
    deny_imports: tuple[str, ...] = ()
    allow_dunders: tuple[str, ...] = ()
    deny_dunders: tuple[str, ...] = ()

    @field_validator("allow_imports")
    @classmethod
    def _admissible_roots(cls, roots: tuple[str, ...]) -> tuple[str, ...]:
        for root in roots:
            if not root.isidentifier() or root.startswith("_"):
                raise ValueError(
                    f"{root!r}: allow_imports lists public top-level modules (e.g. scipy); "
                    "narrow a module with deny_imports instead"
                )
            if root in NEVER_IMPORTS:
                raise ValueError(
                    f"{root!r} cannot be allowed: it reaches processes, files, the network, "
                    "code loading or the site's own code"
                )
        return roots

    @field_validator("deny_imports")
    @classmethod
    def _dotted(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            if not _DOTTED.match(path):
                raise ValueError(f"{path!r} is not a dotted module path")
        return paths

    @field_validator("allow_dunders", "deny_dunders")
    @classmethod
    def _dunders(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not _DUNDER.match(name):
                raise ValueError(f"{name!r} is not a dunder name (__like_this__)")
        return names

    @field_validator("allow_dunders")
    @classmethod
    def _admissible_dunders(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if name in NEVER_DUNDERS:
                raise ValueError(
                    f"{name!r} cannot be allowed: it reaches object internals, the code's "
                    "namespaces or import machinery, or runs code implicitly"
                )
        return names

    @model_validator(mode="after")
    def _named_and_consistent(self) -> PolicyConfig:
        both = sorted(set(self.allow_imports) & set(self.deny_imports))
        both += sorted(set(self.allow_dunders) & set(self.deny_dunders))
        if both:
            raise ValueError(f"allowed and denied at once: {', '.join(both)}")
        changed = self.allow_imports or self.deny_imports or self.allow_dunders
        if (changed or self.deny_dunders) and self.name == DEFAULT_NAME:
            raise ValueError(
                f"a policy that changes the rules needs a name of its own, not {DEFAULT_NAME!r} "
                "(users are told which policy refused their code)"
            )
        return self


def build_source_policy(cfg: PolicyConfig) -> SourcePolicy:
    """The SourcePolicy `cfg` describes: the default, widened and narrowed (a pure function)."""
    base = SourcePolicy()
    roots = (base.import_roots | set(cfg.allow_imports)) - set(cfg.deny_imports)
    denied = base.denied | {path for path in cfg.deny_imports if "." in path}
    dunders = (base.dunder_allowlist | set(cfg.allow_dunders)) - set(cfg.deny_dunders)
    return dataclasses.replace(
        base,
        name=cfg.name,
        version=cfg.version,
        import_roots=frozenset(roots),
        denied=frozenset(denied),
        dunder_allowlist=frozenset(dunders),
    )
