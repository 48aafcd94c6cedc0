"""The nnsight 0.8.1 conformance kinds, end to end, remote results `torch.equal` to local.

Each scenario is ordinary researcher code run twice: once with `remote=True` through the
broker (inline delivery and URL delivery) against the demo sites, once locally on a dispatched
copy of the same weights. Both demo models (tiny GPT-2 and tiny Llama) are covered.
"""

from __future__ import annotations

import asyncio
import time

import nnsight
import pytest
import torch
from nnsight import CONFIG
from nnsight.intervention.backends.remote import AsyncRemoteBackend, RemoteBackend, RemoteError

from edif.demo import TINY_GPT2, TINY_LLAMA, load

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"
CLEAN = "The Eiffel Tower stands in paris"
CORRUPT = "The cat sat on the mat"
MODELS = [TINY_GPT2, TINY_LLAMA]


def layers(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """Where the sites run the models, and so where the local reference must run too: CUDA
    kernels are bit-identical to CUDA kernels, not to the CPU's."""
    return pytestconfig.getoption("--model-device")


@pytest.fixture(scope="module", params=MODELS)
def pair(request, mesh, device):
    """(remote meta model, local dispatched model) for one demo model."""
    home = mesh.home
    placed = {} if device == "cpu" else {"device_map": f"{device}:0"}
    remote = load(request.param, home=home)
    return remote, load(request.param, home=home, dispatch=True, **placed)


@pytest.fixture(params=["inline", "url"])
def host(request, mesh):
    CONFIG.API.HOST = mesh.url if request.param == "inline" else mesh.url_only
    CONFIG.API.APIKEY = mesh.token()
    CONFIG.API.COMPRESS = True
    return CONFIG.API.HOST


def hidden_and_logits(model, **kw):
    with model.trace(PROMPT, **kw):
        h = layers(model)[1].output.save()
        logits = model.lm_head.output.save()
    return {"h": h, "logits": logits}


def set_layer_output(model, **kw):
    with model.trace(PROMPT, **kw):
        layers(model)[0].output = layers(model)[0].output * 0.5
        logits = model.lm_head.output.save()
    return {"logits": logits}


def clean_activation(local) -> torch.Tensor:
    with local.trace(CLEAN):
        clean = layers(local)[1].output[:, -1, :].save()
    return clean


def patch_shipped(model, clean, **kw):
    with model.trace(CORRUPT, **kw):
        layers(model)[1].output[:, -1, :] = clean
        logits = model.lm_head.output.save()
    return {"logits": logits}


def patch_across_invokes(model, **kw):
    with model.trace(**kw) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(CLEAN):
            clean = layers(model)[1].output[:, -1, :]
            barrier()
        with tracer.invoke(CORRUPT):
            barrier()
            layers(model)[1].output[:, -1, :] = clean
            logits = model.lm_head.output.save()
    return {"logits": logits}


def patch_in_session(model, **kw):
    with model.session(**kw):
        with model.trace(CLEAN):
            clean = layers(model)[1].output[:, -1, :]
        with model.trace(CORRUPT):
            layers(model)[1].output[:, -1, :] = clean
            logits = model.lm_head.output.save()
    return {"logits": logits}


def generate(model, **kw):
    with model.generate(PROMPT, max_new_tokens=4, do_sample=False, **kw) as tracer:
        ids = tracer.result.save()
    return {"ids": ids}


def assert_equal(remote: dict, local: dict) -> None:
    """Bit-identical. The nnsight client loads results onto the CPU (`map_location="cpu"`), so
    a CUDA reference is copied there first; the copy changes no bit."""
    assert remote.keys() == local.keys()
    for name in local:
        assert torch.equal(remote[name], local[name].cpu()), name


def test_sites_run_the_models_on_the_device(mesh, device) -> None:
    """Each agent's join summary places every demo model on the reference's device."""
    for site in ("ansbach-demo", "fau-demo", "heilbronn-demo"):
        rows = [line.split() for line in mesh.log(f"agent-{site}").splitlines()]
        placed = {row[0]: row[3] for row in rows if row and row[0] in MODELS and len(row) > 3}
        assert placed, f"no placement summary in agent-{site}.log"
        expected = "cpu" if device == "cpu" else f"{device}:0"
        assert set(placed.values()) == {expected}, (site, placed)


@pytest.mark.parametrize(
    "scenario", [hidden_and_logits, set_layer_output, patch_across_invokes, generate]
)
def test_scenario_equal_to_local(pair, host, scenario) -> None:
    remote_model, local = pair
    assert_equal(scenario(remote_model, remote=True), scenario(local))
    assert remote_model.dispatched is False


def test_patch_with_shipped_tensor(pair, host) -> None:
    remote_model, local = pair
    clean = clean_activation(local)
    remote = patch_shipped(remote_model, clean, remote=True)
    assert_equal(remote, patch_shipped(local, clean))
    unpatched = hidden_and_logits(local)["logits"]
    assert not torch.equal(remote["logits"][:, -1], unpatched[:, -1].cpu())


def test_patch_inside_remote_session(pair, host) -> None:
    remote_model, local = pair
    assert_equal(patch_in_session(remote_model, remote=True), patch_in_session(local))


def test_print_is_relayed_as_log(pair, host, capsys) -> None:
    remote_model, _ = pair
    CONFIG.APP.REMOTE_LOGGING = True
    with remote_model.trace(PROMPT, remote=True):
        print(layers(remote_model)[1].output.shape)
        _ = remote_model.lm_head.output.save()
    out = capsys.readouterr()
    assert "LOG" in out.out + out.err
    assert "torch.Size([1, " in out.out + out.err


def test_remote_error_raises_with_remote_exception_line(pair, host) -> None:
    remote_model, _ = pair
    with pytest.raises(RemoteError) as info:
        with remote_model.trace(PROMPT, remote=True):
            _ = layers(remote_model)[7].output.save()
    assert "AttributeError" in str(info.value)
    # The site keeps serving after a user error.
    remote, local = hidden_and_logits(remote_model, remote=True), hidden_and_logits(pair[1])
    assert_equal(remote, local)


def test_non_blocking_poll(pair, host) -> None:
    remote_model, local = pair
    with remote_model.trace(PROMPT, remote=True, blocking=False) as tracer:
        logits = remote_model.lm_head.output.save()  # noqa: F841
    deadline = time.monotonic() + 60
    result = None
    while result is None and time.monotonic() < deadline:
        result = tracer.backend()
        time.sleep(0.1)
    assert result is not None
    assert_equal({"logits": result["logits"]}, {"logits": hidden_and_logits(local)["logits"]})


def test_async_backend(pair, host) -> None:
    remote_model, local = pair
    backend = AsyncRemoteBackend(
        remote_model.to_model_key(), env=remote_model._remoteable_get_env()
    )
    with remote_model.trace(PROMPT, backend=backend):
        logits = remote_model.lm_head.output.save()  # noqa: F841
    result = asyncio.run(_await(backend))
    assert_equal({"logits": result["logits"]}, {"logits": hidden_and_logits(local)["logits"]})


async def _await(backend):
    return await backend


def test_uncompressed_payloads(pair, host) -> None:
    remote_model, local = pair
    CONFIG.API.COMPRESS = False
    try:
        assert_equal(hidden_and_logits(remote_model, remote=True), hidden_and_logits(local))
    finally:
        CONFIG.API.COMPRESS = True


def test_per_call_host_override(pair, host, mesh) -> None:
    remote_model, local = pair
    CONFIG.API.HOST = "http://127.0.0.1:9"  # nothing listens on the discard port
    target = mesh.url_only if host == mesh.url else mesh.url
    assert_equal(hidden_and_logits(remote_model, remote=target), hidden_and_logits(local))


def test_explicit_backend_with_env_key(pair, mesh, monkeypatch) -> None:
    remote_model, local = pair
    CONFIG.API.HOST = mesh.url
    backend = RemoteBackend(
        remote_model.to_model_key(),
        host=mesh.url,
        api_key=mesh.token(),
        env=remote_model._remoteable_get_env(),
    )
    with remote_model.trace(PROMPT, backend=backend):
        logits = remote_model.lm_head.output.save()
    assert_equal({"logits": logits}, {"logits": hidden_and_logits(local)["logits"]})


def test_status_env_whoami(mesh) -> None:
    CONFIG.API.HOST = mesh.url
    CONFIG.API.APIKEY = mesh.token("bob@uni-example.eu")
    status = nnsight.status()
    assert TINY_GPT2 in status and TINY_LLAMA in status
    raw = nnsight.status(raw=True)
    assert "deployments" in raw and len(raw["deployments"]) >= 4
    assert nnsight.is_model_running  # the client API exists; its Hub lookup needs the network
    comparison = nnsight.compare()
    assert comparison is not None
    me = nnsight.whoami()
    assert me["email"] == "bob@uni-example.eu"
