"""check_source on snippets: attacks refused at the right line, interpretability code admitted."""

from __future__ import annotations

import dataclasses
import io
import math
import operator
import pickle
import textwrap
import types

import cloudpickle.cloudpickle as cloudpickle_impl
import numpy as np
import pytest
import torch
from nnsight.intervention import serialization

from edif.errors import GlobalNotAllowed, PayloadRefused, SourceRefused
from site_agent.source_policy import (
    SourcePolicy,
    check_namespace,
    check_source,
    module_bindings,
)
from site_agent.unpickler import AllowlistUnpickler, PayloadPolicy

POLICY = SourcePolicy()
# What a block's shipped namespace typically binds to modules.
BINDINGS = {
    "torch": torch,
    "np": np,
    "F": torch.nn.functional,
    "math": math,
    "operator": operator,
}


def check(source: str, bindings: dict | None = None) -> None:
    check_source(textwrap.dedent(source), "/home/researcher/experiment.py", POLICY, bindings)


def refusal(source: str) -> SourceRefused:
    with pytest.raises(SourceRefused) as caught:
        check(source, BINDINGS)
    return caught.value


# (snippet, line of the refused construct, a fragment of the message)
REFUSED = [
    # imports of modules outside the roots
    ("import os", 1, "import of 'os'"),
    ("x = 1\nimport subprocess", 2, "import of 'subprocess'"),
    ("import socket", 1, "import of 'socket'"),
    ("import ctypes", 1, "import of 'ctypes'"),
    ("import importlib", 1, "import of 'importlib'"),
    ("import sys", 1, "import of 'sys'"),
    ("import builtins", 1, "import of 'builtins'"),
    ("import pickle, marshal", 1, "import of 'pickle'"),
    ("from os import system", 1, "import of 'os'"),
    ("if False:\n    pass\nelse:\n    import shutil", 4, "import of 'shutil'"),
    ("from . import helpers", 1, "a relative import"),
    ("from torch import *", 1, "'from torch import *'"),
    ("from torch import load", 1, "'torch.load'"),
    ("import torch.utils.cpp_extension", 1, "import of 'torch.utils.cpp_extension'"),
    ("import nnsight.intervention.serialization", 1, "'nnsight.intervention.serialization'"),
    # builtins that run strings, open files or read the scope, also as values
    ("__import__('os')", 1, "'__import__'"),
    ("y = eval('1 + 1')", 1, "the builtin 'eval'"),
    ("exec('x = 1')", 1, "the builtin 'exec'"),
    ("c = compile('1', 'f', 'eval')", 1, "the builtin 'compile'"),
    ("data = open('/etc/passwd').read()", 1, "the builtin 'open'"),
    ("print(open)", 1, "the builtin 'open'"),
    ("v = vars(model)", 1, "the builtin 'vars'"),
    ("g = globals()", 1, "the builtin 'globals'"),
    ("l = locals()", 1, "the builtin 'locals'"),
    ("breakpoint()", 1, "the builtin 'breakpoint'"),
    ("answer = input()", 1, "the builtin 'input'"),
    ("x = (\n    1 +\n    eval('2'))", 3, "the builtin 'eval'"),
    ("def f(input):\n    return input\nprint(input)", 3, "the builtin 'input'"),
    ("xs = [input for input in ys]\ninput()", 2, "the builtin 'input'"),
    # dunders and introspection
    ("h = 1\nsubs = ().__class__.__base__.__subclasses__()", 2, "'__class__'"),
    ("g = f.__globals__", 1, "'__globals__'"),
    ("subs = type(x).__subclasses__()", 1, "'__subclasses__'"),
    ("f = lambda m: m.__dict__", 1, "'__dict__'"),
    ("b = print.__self__", 1, "'__self__'"),
    ("c = f.__code__.co_consts", 1, "'__code__'"),
    ("e = err.__traceback__.tb_frame", 1, "'__traceback__'"),
    ("def gen():\n    yield 1\ng = gen()\nframe = g.gi_frame", 4, "'gi_frame'"),
    ("frame = sys._getframe()", 1, "'_getframe'"),
    ("up = frame.f_back.f_globals", 1, "'f_back'"),
    ("code.replace(co_code=b'')", 1, "'co_code'"),
    ("b = __builtins__", 1, "the name '__builtins__'"),
    ("match x:\n    case object(__class__=c):\n        pass", 2, "'__class__'"),
    ("d = {'__del__': f}", 1, "a string naming '__del__'"),
    ("class Hook:\n    def __init_subclass__(cls):\n        pass", 2, "'__init_subclass__'"),
    ("class Leak:\n    def __del__(self):\n        pass", 2, "'__del__'"),
    ("C = type('C', (), {'f': f})", 1, "'type' with more than one argument"),
    ("class M(metaclass=Meta):\n    pass", 1, "a metaclass"),
    # attribute names built at run time
    ("g = getattr(f, '__glo' + 'bals__')", 1, "not a constant string"),
    ("g = getattr(f, name)", 1, "not a constant string"),
    ("g = getattr(f, f'__{name}__')", 1, "not a constant string"),
    ("g = getattr(f, '__globals__')", 1, "'__globals__'"),
    ("ok = hasattr(f, '__code__')", 1, "'__code__'"),
    ("g = getattr", 1, "'getattr' other than called"),
    ("s = '{0.__globals__}'.format(f)", 1, "'__globals__'"),
    ("s = template.format(f)", 1, "'.format' on anything but a constant string"),
    ("fn = operator.attrgetter('__globals__')", 1, "'operator.attrgetter'"),
    # module members that reach files, code loading, processes or the network
    ("state = torch.load('weights.pt')", 1, "'torch.load'"),
    ("torch.save(x, '/tmp/x.pt')", 1, "'torch.save'"),
    ("a = np.load('x.npy')", 1, "'numpy.load'"),
    ("np.lib.format.open_memmap('x.npy')", 1, "'numpy.lib.format'"),
    ("p = np.ctypeslib.as_array(q)", 1, "'numpy.ctypeslib'"),
    ("torch.utils.cpp_extension.load_inline('m', 'int x;')", 1, "'torch.utils'"),
    ("torch.ops.load_library('/tmp/evil.so')", 1, "load_library"),
    ("m = torch.hub.load('evil/repo', 'model')", 1, "'torch.hub'"),
    ("t = torch.from_file('/etc/passwd')", 1, "'torch.from_file'"),
    ("f = torch.compile(g)", 1, "'torch.compile'"),
    ("s = torch.jit.script(g)", 1, "'torch.jit'"),
    ("x = torch._C._get_tracing_state()", 1, "the private module member 'torch._C'"),
    ("import typing\nhints = typing.get_type_hints(f)", 2, "'typing.get_type_hints'"),
    ("import nnsight\nnnsight.CONFIG.API.HOST = 'x'", 2, "'nnsight.CONFIG'"),
    # a module reached through another module's attributes
    ("torch.os.system('id')", 1, "which is the module 'os'"),
    ("F.torch.load('x')", 1, "'torch.load'"),
    ("from torch import os", 1, "which is the module 'os'"),
    ("g = getattr(torch, 'load')", 1, "'torch.load'"),
    # modules used as values, aliased, or changed
    ("t = torch\nx = 1\nt.load('x')", 3, "'torch.load'"),
    ("m = torch.nn\nm = torch\nm.save(x, 'f')", 3, "'torch.save'"),
    (
        "def helper(m):\n    return m.load('x')\nhelper(torch)",
        3,
        "using the module 'torch' as a value",
    ),
    ("mods = [np]", 1, "using the module 'np' as a value"),
    ("ld = (lambda: torch)()", 1, "using the module 'torch' as a value"),
    ("class A:\n    t = torch", 2, "using the module 'torch' as a value"),
    ("class A:\n    import torch as t", 2, "an import in a class body"),
    ("class A:\n    if True:\n        import torch as t", 3, "an import in a class body"),
    ("class A:\n    if True:\n        t = torch", 3, "using the module 'torch' as a value"),
    ("torch.nn.functional.softmax = print", 1, "assigning or deleting"),
    ("setattr(torch, 'manual_seed', f)", 1, "setattr() on a module"),
    # nnsight plumbing, loaders, hooks that outlive the job
    ("f = tracer.info.frame", 1, "'info'"),
    ("text = tracer.source('/etc/passwd')", 1, "'.source' other than"),
    ("model.tokenizer.from_pretrained('evil/repo', trust_remote_code=True)", 1, "from_pretrained"),
    ("model._module.save_pretrained('/tmp/x')", 1, "save_pretrained"),
    ("model.transformer.h[0].register_forward_hook(f)", 1, "register_forward_hook"),
    ("x.numpy().tofile('/tmp/x')", 1, "'tofile'"),
]


@pytest.mark.parametrize(("source", "line", "fragment"), REFUSED)
def test_attacks_are_refused_at_their_line(source: str, line: int, fragment: str) -> None:
    refused = refusal(source)
    assert refused.lineno == line
    message = refused.message
    assert message.startswith(f"line {line}: ")
    assert fragment in message
    assert "site policy edif-default v1" in message
    assert "[/home/researcher/experiment.py]" in message


ALLOWED = [
    # logit lens
    """
    with model.trace(prompt) as tracer:
        probs = []
        for layer in model.transformer.h:
            logits = model.lm_head(model.transformer.ln_f(layer.output))
            probs.append(torch.nn.functional.softmax(logits, dim=-1)[:, -1, :].save())
    """,
    # activation patching across invokes
    """
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(clean_prompt):
            clean = model.transformer.h[5].output[:, -1, :]
            barrier()
        with tracer.invoke(corrupt_prompt):
            barrier()
            model.transformer.h[5].output[:, -1, :] = clean
            logits = model.lm_head.output.save()
    """,
    # generation
    """
    with model.generate(prompt, max_new_tokens=3) as tracer:
        for step in tracer.iter[:3]:
            step_logits = model.lm_head.output.save()
        tokens = tracer.result.save()
    """,
    # gradients (nnsight 0.8: `with loss.backward():` and `.grad`)
    """
    with model.trace(prompt):
        hidden = model.transformer.h[0].output
        loss = model.lm_head.output.sum()
        with loss.backward():
            grad = hidden.grad.save()
    """,
    "logits.sum().backward()\ng = x.grad.save()",
    # everyday tensor code
    "import einops\ny = einops.rearrange(x, 'b s d -> s b d')",
    "n = x.norm(dim=-1)\nprint(x.shape)\nprint(f'{x.shape} {n.mean():.3f}')",
    "with torch.no_grad():\n    y = F.softmax(x, -1)",
    "ys = [a * 2 for a in xs if a]\nd = {k: v for k, v in pairs}\ns = sum(v for v in ys)",
    "for i in range(3):\n    print(i)\nelse:\n    pass",
    "h = getattr(model, 'lm_head').output.save()\nok = hasattr(model, 'transformer')",
    "def helper(v):\n    return v * 2\ny = helper(x)",
    "import torch.nn.functional as G\ny = G.relu(x)\n"
    "from torch.nn import functional as H\nz = H.gelu(x)",
    "m = torch.nn\nlayer = m.Linear(2, 2)",
    "r = np.random.default_rng(0).normal(size=3)\na = np.array(x.tolist())",
    "import nnsight\nnnsight.save(x)\nx.save()",
    "from collections import defaultdict, OrderedDict\nd = defaultdict(list)",
    "import itertools, functools\n"
    "p = functools.partial(torch.add, 1)\nq = list(itertools.product(a, b))",
    "from typing import Any, Optional\nx: Optional[Any] = None",
    "v = math.sqrt(2) + operator.add(1, 2)",
    "s = '{} {:.2f}'.format(a, b)\nt = '%s' % a",
    "print(type(x).__name__)\nif __name__ == '__main__':\n    pass",
    "f = lambda input: input + 1\n"
    "def g(input, *args, **kwargs):\n    return [input for input in args]",
    "try:\n    y = 1 / x\nexcept ZeroDivisionError as e:\n    print(e)\nfinally:\n    pass",
    '"""A docstring may mention __globals__ and f_globals."""\nx = 1',
    "op = model.transformer.h[0].attn.source.attention_interface_0.output.save()",
    "torch.manual_seed(0)\nt = torch.float32\nz = torch.zeros(2, dtype=t)",
    # a probe or SAE class, shipped with its methods
    """
    class SAE(torch.nn.Module):
        def __init__(self, d, k):
            super().__init__()
            self.enc = torch.nn.Linear(d, k)

        def forward(self, input):
            return torch.relu(self.enc(input))

        def __repr__(self):
            return 'SAE'
    """,
    "async def f():\n    await g()",
    "exit(3)",
]


@pytest.mark.parametrize("source", ALLOWED)
def test_interpretability_code_is_admitted(source: str) -> None:
    check(source, BINDINGS)


def test_a_refusal_is_a_payload_refusal_naming_the_policy() -> None:
    policy = dataclasses.replace(POLICY, name="fau-strict", version=3)
    with pytest.raises(SourceRefused) as caught:
        check_source("import os\n", "block.py", policy)
    assert isinstance(caught.value, PayloadRefused)
    message = caught.value.message
    assert "site policy fau-strict v3" in message
    assert "allowed imports: collections, einops, functools, itertools, math, " in message
    assert "nnsight (Envoy, NNsight, Object, save only)" in message


def test_first_line_offsets_the_reported_line() -> None:
    with pytest.raises(SourceRefused) as caught:
        check_source("def f():\n    import os\n", "[f:40] x.py", POLICY, first_line=40)
    assert caught.value.lineno == 41 and caught.value.message.startswith("line 41: ")


def test_unparseable_and_overly_nested_sources_are_refused() -> None:
    with pytest.raises(SourceRefused, match="does not parse"):
        check("x = (")
    with pytest.raises(SourceRefused, match="nested this deeply|cannot be parsed"):
        check("x = " + "+".join(["1"] * 20_000))


def test_the_policy_describes_itself() -> None:
    described = POLICY.describe()
    assert described["name"] == "edif-default" and described["version"] == 1
    assert "torch" in described["import_roots"] and "os" not in described["import_roots"]
    assert "__init__" in described["dunder_allowlist"]
    assert "__globals__" not in described["dunder_allowlist"]
    assert {"eval", "exec", "open", "__import__"} <= set(described["forbidden_calls"])
    assert "torch.load" in described["denied"]
    assert described == POLICY.describe()  # plain, stable data


def test_a_site_can_extend_the_roots() -> None:
    policy = dataclasses.replace(POLICY, import_roots=POLICY.import_roots | {"json"}, version=2)
    check_source("import json\n", "block.py", policy)
    with pytest.raises(SourceRefused):
        check_source("import json\n", "block.py", POLICY)


def test_namespaces_cannot_replace_builtins_or_ship_other_modules() -> None:
    check_namespace({"torch": torch, "F": torch.nn.functional, "x": 1}, "the globals", POLICY)
    with pytest.raises(SourceRefused, match="sets '__builtins__'"):
        check_namespace({"__builtins__": {}}, "the globals", POLICY)
    with pytest.raises(SourceRefused, match="holds the module 'os'"):
        check_namespace({"o": __import__("os")}, "the globals", POLICY)
    with pytest.raises(SourceRefused, match="holds the module 'torch.serialization'"):
        check_namespace({"s": torch.serialization}, "the globals", POLICY)


def test_module_bindings_let_locals_shadow_globals() -> None:
    bindings = module_bindings({"np": np, "torch": torch}, {"np": 3})
    assert bindings == {"torch": torch}


def test_a_name_is_only_a_module_where_the_namespace_makes_it_one() -> None:
    # Without bindings `np` is an unknown object: the check cannot (and need not) refuse
    # `np.load` -- with the real binding it does.
    check("a = np.load('x')")
    with pytest.raises(SourceRefused, match="'numpy.load'"):
        check("a = np.load('x')", {"np": np})


# --- one list of module roots: the source policy's, also for cloudpickle.subimport -------------


class Call:
    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def unpickle(data: bytes) -> object:
    return AllowlistUnpickler(io.BytesIO(data), {}).load()


def test_the_payload_policy_shares_the_source_policys_roots() -> None:
    assert PayloadPolicy().import_roots == SourcePolicy().import_roots
    assert unpickle(pickle.dumps(Call(cloudpickle_impl.subimport, "torch.nn"))) is torch.nn
    for name in ("transformers", "torch.utils.cpp_extension", "torch._C", "nnsight.ndif"):
        with pytest.raises(GlobalNotAllowed, match=f"module {name} is not allowed"):
            unpickle(pickle.dumps(Call(cloudpickle_impl.subimport, name)))


def test_a_payload_module_is_walked_like_a_namespace() -> None:
    helpers = types.ModuleType("helpers")  # as cloudpickle rebuilds a by-value module
    helpers.torch = torch
    with pytest.raises(SourceRefused, match="'torch.load'"):
        check("helpers.torch.load('x')", {"helpers": helpers})
    check("helpers.torch.zeros(2)", {"helpers": helpers})


# --- shipped functions and classes, as the unpickler rebuilds them ------------------------------


def load_function(source: str, line: int = 1) -> Call:
    return Call(serialization._load_function, source, "f", None, None, None, "evil.py", line)


def test_a_shipped_function_is_checked_with_its_line_and_file() -> None:
    with pytest.raises(SourceRefused) as caught:
        unpickle(pickle.dumps(load_function("def f():\n    import os\n", line=30)))
    assert caught.value.lineno == 31 and "[f:30] evil.py" in caught.value.message


def test_a_shipped_function_is_checked_again_with_its_module_globals() -> None:
    source = "def f():\n    return np.load('x.npy')\n"
    numpy_module = Call(cloudpickle_impl.subimport, "numpy")
    blob = pickle.dumps(Call(serialization._fill, load_function(source), {"np": numpy_module}))
    with pytest.raises(SourceRefused, match="line 2: 'numpy.load'"):
        unpickle(blob)


def test_a_shipped_function_is_inert_until_released() -> None:
    unpickler = AllowlistUnpickler(
        io.BytesIO(pickle.dumps(load_function("def f():\n    return 7\n"))), {}
    )
    f = unpickler.load()
    with pytest.raises(KeyError, match="still being checked"):
        f()
    unpickler.release(f, [])
    assert f() == 7


def test_a_shipped_function_must_have_nnsights_shape() -> None:
    with pytest.raises(PayloadRefused, match="not in the form nnsight ships"):
        unpickle(pickle.dumps(load_function("def f():\n    pass\n", line=10**9)))


def test_a_shipped_class_cannot_bring_a_hook_under_another_name() -> None:
    skeleton = Call(cloudpickle_impl._make_skeleton_class, type, "X", (object,), {}, "id-1", None)
    blob = pickle.dumps(Call(cloudpickle_impl._class_setstate, skeleton, ({"__del__": 1}, {})))
    with pytest.raises(PayloadRefused, match="sets '__del__'"):
        unpickle(blob)


def test_verdicts_are_cached_per_policy_source_and_place() -> None:
    from site_agent import source_policy

    source = "import statistics\ny = 1\n"
    wider = dataclasses.replace(
        POLICY, name="wider", import_roots=POLICY.import_roots | {"statistics"}
    )
    sizes = []
    # The first round may import `statistics` (resolving it), which changes the key's module
    # count; later rounds are answered from the cache, identically.
    for _ in range(3):
        with pytest.raises(SourceRefused, match="line 1: .*edif-default v1") as caught:
            check_source(source, "/r/a.py", POLICY)
        assert caught.value.lineno == 1
        check_source(source, "/r/a.py", wider)
        with pytest.raises(SourceRefused, match="line 11: .*b.py"):
            check_source(source, "/r/b.py", POLICY, first_line=11)
        sizes.append(len(source_policy._VERDICTS))
    assert sizes[1] == sizes[2]
    assert len({k for k in source_policy._VERDICTS if k[2] in ("/r/a.py", "/r/b.py")}) >= 3


def test_verdicts_with_a_payload_built_module_are_not_cached() -> None:
    from site_agent import source_policy

    helpers = types.ModuleType("helpers")  # as cloudpickle rebuilds a by-value module
    helpers.torch = torch
    before = len(source_policy._VERDICTS)
    check("helpers.torch.zeros(2)", {"helpers": helpers})
    assert len(source_policy._VERDICTS) == before
    helpers.torch = np  # the same source now means something else, and is checked again
    check("helpers.torch.zeros(2)", {"helpers": helpers})
    check("np.zeros(2)", {"np": np})
    assert len(source_policy._VERDICTS) == before + 1
