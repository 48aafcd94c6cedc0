"""The restricted runtime a request's block runs under (sandbox layer 2).

Role: the source policy (layer 1) reads the code; this layer holds at run time for what it
cannot see (a name built from strings, an object handed in from elsewhere). The block runs
against a builtins mapping made from the real one where:
- `__import__` admits only modules the site's `SourcePolicy` admits (`import_roots`, nothing
  denied or private, members of restricted roots only), so an `import` that static checks
  missed still fails;
- the builtins the policy forbids (`eval`, `exec`, `compile`, `open`, `__import__` by name,
  `globals`, `vars`, `breakpoint`, `input`, ...) raise `SandboxViolation` when called;
- `getattr`/`setattr`/`delattr`/`hasattr` refuse attribute names the policy refuses (dunders
  outside its allowlist, frame/code introspection, loaders), however the name was built.

Flow: `restricted_builtins(policy)` builds the mapping once per policy (cached);
`execution.deserialize` puts it under `__builtins__` in the block's globals and in the
locals snapshot nnsight's `Scope` is made from (`exec` takes the builtins from the dict it
runs against, and only inserts the real ones when that key is missing). Functions the
client shipped by source (`_load_function`) take their builtins from their globals when the
function object is created, so the unpickler creates them on globals holding this mapping
too (`unpickler.AllowlistUnpickler._load_function`); functions they or the block define at
run time inherit it. Only code compiled from the request sees it: torch, nnsight and
transformers keep their own module builtins.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from edif.errors import SandboxViolation
from site_agent.source_policy import SourcePolicy


@functools.cache
def restricted_builtins(policy: SourcePolicy) -> MappingProxyType:
    """The builtins a block runs with under `policy` (read-only; see module doc)."""
    table: dict[str, Any] = dict(vars(builtins))
    for name in policy.forbidden_calls:
        if name in table:
            table[name] = _refusing(name, policy)
    table["__import__"] = functools.partial(_guarded_import, policy)
    table["getattr"] = _checked_attr(getattr, policy)
    table["setattr"] = _checked_attr(setattr, policy)
    table["delattr"] = _checked_attr(delattr, policy)
    table["hasattr"] = _checked_attr(hasattr, policy)
    for name in ("__loader__", "__spec__"):  # the import machinery's handles
        table.pop(name, None)
    # A mappingproxy is not a dict, and CPython wants a dict for the builtins of a frame.
    return MappingProxyType(table)


def builtins_dict(policy: SourcePolicy) -> dict[str, Any]:
    """A fresh dict copy of the restricted builtins (what a frame's globals can hold)."""
    return dict(restricted_builtins(policy))


def _refusing(name: str, policy: SourcePolicy) -> Callable[..., Any]:
    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise SandboxViolation(f"{name}() is not available on this site (policy {policy.label})")

    refused.__name__ = name
    return refused


def _guarded_import(
    policy: SourcePolicy,
    name: str,
    globals: Any = None,  # noqa: A002 - __import__'s own signature
    locals: Any = None,  # noqa: A002
    fromlist: Any = (),
    level: int = 0,
) -> Any:
    if level != 0 or not isinstance(name, str) or not policy.admits_module(name):
        raise SandboxViolation(
            f"import of {name!r} is not allowed on this site; allowed: "
            f"{policy.allowed_imports()} (policy {policy.label})"
        )
    for member in fromlist or ():
        path = f"{name}.{member}"
        if not isinstance(member, str) or policy.denies(path) or member.startswith("_"):
            raise SandboxViolation(f"'from {name} import {member}' is not allowed on this site")
    return builtins.__import__(name, globals, locals, fromlist, level)


def attribute_refused(name: Any, policy: SourcePolicy) -> bool:
    """Whether the policy refuses reading or writing attribute `name` on any object."""
    if not isinstance(name, str):
        return True
    if name.startswith("__") and name.endswith("__") and name not in policy.dunder_allowlist:
        return True
    return name in policy.forbidden_attributes


def _checked_attr(real: Callable[..., Any], policy: SourcePolicy) -> Callable[..., Any]:
    def checked(obj: Any, name: Any, *rest: Any) -> Any:
        if attribute_refused(name, policy):
            raise SandboxViolation(
                f"{real.__name__}() of attribute {name!r} is not allowed on this site "
                f"(policy {policy.label})"
            )
        return real(obj, name, *rest)

    checked.__name__ = real.__name__
    return checked
