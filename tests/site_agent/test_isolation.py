"""The isolation fingerprint (sandbox layer 4): what a job changed in shared state is named."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from site_agent.isolation import FULL_HASH_MAX_ELEMENTS, differences, fingerprint


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    big = FULL_HASH_MAX_ELEMENTS * 3 + 5  # hashed by a stride sample plus the last element
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(big, 1, bias=False))
    net.register_buffer("halves", torch.ones(8, dtype=torch.bfloat16))
    return net


def test_nothing_changed_nothing_named(model) -> None:
    base = fingerprint(model, baseline=True)
    with torch.no_grad():
        model[0](torch.zeros(1, 4))  # using the model changes nothing shared
    assert differences(base, fingerprint(model)) == []


def test_a_replaced_function_is_named_even_if_it_claims_equality(model, monkeypatch) -> None:
    base = fingerprint(model, baseline=True)

    class Liar:
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

        def __call__(self) -> None:
            return None

    monkeypatch.setattr(torch, "save", Liar())
    assert differences(base, fingerprint(model)) == ["torch.save was replaced or removed"]


def test_data_attributes_and_lazy_additions_do_not_count(model, monkeypatch) -> None:
    base = fingerprint(model, baseline=True)
    monkeypatch.setattr(torch, "_edif_test_counter", 1, raising=False)  # added later
    monkeypatch.setitem(sys.modules, "edif_test_lazy", types.ModuleType("edif_test_lazy"))
    monkeypatch.setattr(torch.nn.functional, "__doc__", "changed")  # data, not callable
    assert differences(base, fingerprint(model)) == []


def test_a_replaced_or_removed_module_is_named(model, monkeypatch) -> None:
    base = fingerprint(model, baseline=True)
    monkeypatch.setitem(sys.modules, "json", types.ModuleType("json"))
    monkeypatch.delitem(sys.modules, "zlib")
    found = differences(base, fingerprint(model))
    assert "sys.modules['json'] was replaced or removed" in found
    assert "sys.modules['zlib'] was replaced or removed" in found


@pytest.mark.parametrize(
    ("name", "index"),
    [("0.weight", (1, 2)), ("1.weight", (0, 0)), ("1.weight", (0, -1)), ("halves", (3,))],
)
def test_an_edit_behind_the_version_counter_is_named(model, name: str, index: tuple) -> None:
    base = fingerprint(model, baseline=True)
    tensor = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        tensor[name].data[index] += 1  # `.data` bypasses the version counter
    assert differences(base, fingerprint(model)) == [f"the model's tensor {name} changed"]


def test_a_hook_or_a_swapped_parameter_is_named(model) -> None:
    base = fingerprint(model, baseline=True)
    handle = model[0].register_forward_hook(lambda *a: None)
    assert differences(base, fingerprint(model)) == ["the model's module tree or hooks changed"]
    handle.remove()
    model[0].bias = torch.nn.Parameter(model[0].bias.detach().clone())
    assert differences(base, fingerprint(model)) == ["the model's tensor 0.bias changed"]


def test_torch_settings_are_compared(model) -> None:
    base = fingerprint(model, baseline=True)
    torch.set_default_dtype(torch.float64)
    try:
        found = differences(base, fingerprint(model))
    finally:
        torch.set_default_dtype(torch.float32)
    # (torch also swaps its `torch.Storage` alias with the default dtype)
    assert "torch's global settings changed (default dtype/device, grad mode, ...)" in found
