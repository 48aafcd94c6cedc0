"""The site sandbox against attacks, end to end: real nnsight `remote=True` jobs via the broker.

Each attack is a trace block the unmodified client ships to the demo mesh. Every one must be
refused (source policy, layer 1; runtime guard, layer 2) or contained (the job thread's
seccomp filter, layer 3; the isolation check, layer 4, which fails the job and replaces the
worker), and the next legitimate job, from another user, must still be `torch.equal` to a
local run. `SHIPPED_ATTACKS` do the same inside a helper function the block calls, which the
client ships by source (`_load_function`): checked, and run with the same restricted builtins.
The blocks are written to a module file at test time (the client reads a block's source from
its file), one function per attack.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
import textwrap
import uuid

import pytest
import torch
from nnsight import CONFIG
from nnsight.intervention import serialization
from nnsight.intervention.backends.remote import RemoteError
from test_bad_input import envelope, poll_until_final, raw_post

from edif.demo import TINY_GPT2, load

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"

# name -> lines of the block (before the line that saves the logits)
ATTACKS: dict[str, str] = {
    "import_os": "import os\nos.system('touch {marker}')",
    "import_subprocess": "import subprocess\nsubprocess.run(['touch', '{marker}'])",
    "import_socket": "import socket\nsocket.create_connection(('127.0.0.1', 22))",
    "import_ctypes": "import ctypes\nctypes.CDLL(None)",
    "import_importlib": "import importlib\nimportlib.import_module('os')",
    "import_sys": "import sys\nsys.modules.clear()",
    "import_builtins": "import builtins\nbuiltins.open('/etc/passwd')",
    "from_torch_import_load": "from torch.serialization import load",
    "dunder_import": "__import__('os').system('touch {marker}')",
    "eval": "eval('1 + 1')",
    "exec": "exec('import os')",
    "compile": "compile('1', 'f', 'eval')",
    "open_passwd": "open('/etc/passwd').read()",
    "open_environ": "open('/proc/self/environ').read()",
    "write_weights_dir": "open('{weights}/model.safetensors', 'wb').write(b'x')",
    "write_tmp": "open('{marker}', 'w').write('x')",
    "subclasses_escape": "().__class__.__base__.__subclasses__()",
    "subclasses_via_object": "object.__subclasses__()",
    "getattr_built_name": "getattr(len, '__glo' + 'bals__')",
    "getattr_class": "getattr((), '__cla' + 'ss__')",
    "format_escape": "'{{0.__class__}}'.format(1)",
    "globals_builtins": "globals()['__builtins__']",
    "vars": "vars()",
    "breakpoint": "breakpoint()",
    "input": "input()",
    "generator_frame": "(x for x in []).gi_frame",
    "type_three_args": "type('X', (), {{}})",
    "class_with_del": "class X:\n    def __del__(self):\n        pass",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "os_system_via_torch": "import torch\ntorch.os.system('touch {marker}')",
    "socket_localhost": "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 80))",
    "torch_save_none": "import torch\ntorch.save = None",
    "functional_relu_none": "import torch\ntorch.nn.functional.relu = None",
    "torch_load": "import torch\ntorch.load('/etc/passwd')",
    "torch_hub": "import torch\ntorch.hub.load('x', 'y')",
    "torch_load_library": "import torch\ntorch.ops.load_library('/tmp/x.so')",
    "cpp_extension": "import torch\ntorch.utils.cpp_extension.load_inline('x', '')",
    "numpy_load": "import numpy\nnumpy.load('/etc/passwd')",
    "attrgetter": "import operator\noperator.attrgetter('__globals__')(len)",
    "forward_hook": "model.lm_head.register_forward_hook(lambda *a: None)",
    "zero_lm_head": "model.lm_head.weight.data.zero_()",
    "poke_mlp_weight": "model.transformer.h[0].mlp.c_fc.weight.data[0, 0] = 1e9",
    "set_default_dtype": "import torch\ntorch.set_default_dtype(torch.float64)",
    "nnsight_config": "import nnsight\nnnsight.CONFIG.API.HOST = 'x'",
    "exit": "exit(3)",
}

# Attacks inside a helper function the researcher defines and calls in the block: nested in
# the function that traces, so the client ships it by source (nnsight's `_load_function`).
# name -> lines of the helper's body (before `return t`)
SHIPPED_ATTACKS: dict[str, str] = {
    "dunder_import": "__import__('os').system('touch {marker}')",
    "import_os": "import os\nos.system('touch {marker}')",
    "open_passwd": "open('/etc/passwd').read()",
    "write_weights_dir": "open('{weights}/model.safetensors', 'wb').write(b'x')",
    "eval": "eval('1 + 1')",
    "getattr_built_name": "getattr(t, '__glo' + 'bals__')",
    "inner_lambda_import": "f = lambda: __import__('socket')\nf()",
    "torch_save_none": "import torch\ntorch.save = None",
}

# A legitimate shipped helper: torch math, an allowed import, a default argument.
SHIPPED_HELPER = """
def shipped_legitimate(model, remote):
    def centred(t, scale=2.0):
        import math

        return (t - t.mean(dim=-1, keepdim=True)) * math.sqrt(scale)

    with model.trace(PROMPT, remote=remote):
        logits = centred(model.lm_head.output).save()
    return logits
"""


@pytest.fixture(scope="module")
def gpt2(mesh):
    return load(TINY_GPT2, home=mesh.home), load(TINY_GPT2, home=mesh.home, dispatch=True)


@pytest.fixture(scope="module")
def attacks(mesh, tmp_path_factory):
    """A module with one `attack_<name>(model)` per entry of ATTACKS, as a researcher writes."""
    folder = tmp_path_factory.mktemp("attacks")
    marker = folder / "pwned"
    weights = mesh.home / "models"
    parts = ["PROMPT = 'The capital of France is'\n"]
    for name, body in ATTACKS.items():
        block = textwrap.indent(body.format(marker=marker, weights=weights), " " * 8)
        parts.append(
            f"\ndef attack_{name}(model):\n"
            f"    with model.trace(PROMPT, remote=True):\n{block}\n"
            "        logits = model.lm_head.output.save()\n"
            "    return logits\n"
        )
    for name, body in SHIPPED_ATTACKS.items():
        helper = textwrap.indent(body.format(marker=marker, weights=weights), " " * 8)
        parts.append(
            f"\ndef shipped_{name}(model):\n"
            f"    def helper(t):\n{helper}\n        return t\n\n"
            "    with model.trace(PROMPT, remote=True):\n"
            "        logits = helper(model.lm_head.output).save()\n"
            "    return logits\n"
        )
    parts.append(SHIPPED_HELPER)
    path = folder / "attack_blocks.py"
    path.write_text("".join(parts))
    spec = importlib.util.spec_from_file_location("attack_blocks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["attack_blocks"] = module
    spec.loader.exec_module(module)
    return module, marker


def next_user_gets_local_results(mesh, gpt2) -> None:
    CONFIG.API.APIKEY = mesh.token(sub=f"bob-{uuid.uuid4().hex[:6]}@uni-example.eu")
    remote, local = gpt2
    with remote.trace(PROMPT, remote=True):
        r = remote.lm_head.output.save()
    with local.trace(PROMPT):
        expected = local.lm_head.output.save()
    assert torch.equal(r, expected)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_refused_or_contained(mesh, gpt2, attacks, name: str) -> None:
    module, marker = attacks
    CONFIG.API.HOST = mesh.url
    CONFIG.API.APIKEY = mesh.token(sub="mallory@uni-example.eu")
    CONFIG.API.COMPRESS = True
    with pytest.raises(RemoteError):
        getattr(module, f"attack_{name}")(gpt2[0])
    assert not marker.exists()
    next_user_gets_local_results(mesh, gpt2)


@pytest.mark.parametrize("name", sorted(SHIPPED_ATTACKS))
def test_a_shipped_helper_attack_is_refused_or_contained(mesh, gpt2, attacks, name: str) -> None:
    module, marker = attacks
    CONFIG.API.HOST = mesh.url
    CONFIG.API.APIKEY = mesh.token(sub="mallory@uni-example.eu")
    CONFIG.API.COMPRESS = True
    with pytest.raises(RemoteError):
        getattr(module, f"shipped_{name}")(gpt2[0])
    assert not marker.exists()
    next_user_gets_local_results(mesh, gpt2)


def test_a_refusal_names_the_site_and_its_policy(mesh, gpt2, attacks) -> None:
    module, _ = attacks
    CONFIG.API.HOST = mesh.url
    CONFIG.API.APIKEY = mesh.token(sub="mallory@uni-example.eu")
    with pytest.raises(RemoteError) as caught:
        module.shipped_import_os(gpt2[0])
    text = str(caught.value)
    assert "refused your job" in text and "site policy edif-default v1" in text, text


def test_a_legitimate_shipped_helper_matches_local(mesh, gpt2, attacks) -> None:
    module, _ = attacks
    CONFIG.API.HOST = mesh.url
    CONFIG.API.APIKEY = mesh.token(sub="alice@uni-example.eu")
    remote, local = gpt2
    assert torch.equal(
        module.shipped_legitimate(remote, True), module.shipped_legitimate(local, False)
    )


def _load_function_gadget(source: str) -> bytes:
    class Call:
        def __init__(self, func: object, *args: object) -> None:
            self.func, self.args = func, args

        def __reduce__(self) -> tuple:
            return self.func, self.args

        def __call__(self) -> None:  # pickle wants a callable; never called here
            raise AssertionError

    built = Call(serialization._load_function, source, "f", None, None, None, "evil.py", 1)
    return pickle.dumps(Call(built), protocol=4)


@pytest.mark.parametrize(
    "source",
    [
        "def f():\n    import os\n    return os.system('touch {marker}')\n",
        "def f():\n    return 1\n",
    ],
)
def test_a_crafted_load_function_pickle_runs_nothing(mesh, gpt2, attacks, source: str) -> None:
    _, marker = attacks
    token = mesh.token(sub="mallory@uni-example.eu")
    reply = raw_post(mesh, envelope(), _load_function_gadget(source.format(marker=marker)), token)
    assert reply.status_code == 200, reply.text
    final = poll_until_final(mesh, reply.json()["id"], token)
    assert final["status"] == "ERROR" and final["description"]
    assert not marker.exists()
    CONFIG.API.HOST = mesh.url
    next_user_gets_local_results(mesh, gpt2)
