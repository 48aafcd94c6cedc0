"""encode_result: view compaction, container types, and the client's way of reading results."""

from __future__ import annotations

import collections
import io

import torch
import zstandard
from transformers.modeling_outputs import CausalLMOutputWithPast

from site_agent.encoding import compact, encode_result

Pair = collections.namedtuple("Pair", "first second")


def client_load(data: bytes, compress: bool) -> dict:
    """What nnsight 0.8.1's RemoteBackend does with result bytes (spec §5.2)."""
    if compress:
        data = zstandard.ZstdDecompressor().decompress(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def test_a_last_token_view_encodes_to_its_own_size() -> None:
    hidden = torch.randn(1, 7, 64)
    last = hidden[:, -1, :]
    encoded = encode_result({"last": last}, compress=False)
    assert len(encoded) <= len(encode_result({"last": last.clone()}, compress=False)) + 64
    assert len(encoded) < len(encode_result({"last": hidden}, compress=False)) - 1000
    loaded = client_load(encoded, compress=False)["last"]
    assert torch.equal(loaded, last) and loaded.shape == (1, 64)
    assert storage_bytes(loaded) == 64 * 4


def test_compaction_keeps_dtype_values_and_requires_grad() -> None:
    leaf = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    view = leaf[1:3]
    parameter = torch.nn.Parameter(torch.randn(4, 8))
    out = compact({"view": view, "leaf": leaf, "param_view": parameter[0]})
    assert out["leaf"] is leaf  # not a view: left as it is
    assert out["view"].dtype == torch.bfloat16 and out["view"].requires_grad
    assert torch.equal(out["view"], view) and storage_bytes(out["view"]) == 2 * 8 * 2
    assert out["param_view"].requires_grad and storage_bytes(out["param_view"]) == 8 * 4


def test_containers_keep_their_types() -> None:
    base = torch.randn(3, 5)
    value = {
        "list": [base[0], 1],
        "tuple": (base[1], "x"),
        "pair": Pair(base[2], None),
        "ordered": collections.OrderedDict(a=base[:, 0]),
        "output": CausalLMOutputWithPast(logits=base[:2]),
        "size": torch.Size([3, 5]),
    }
    out = compact(value)
    assert type(out["pair"]) is Pair and type(out["ordered"]) is collections.OrderedDict
    assert isinstance(out["output"], CausalLMOutputWithPast)
    assert out["output"].logits is out["output"]["logits"]
    assert out["size"] is value["size"]
    loaded = client_load(encode_result(value, compress=True), compress=True)
    for got, want in [
        (loaded["list"][0], base[0]),
        (loaded["tuple"][0], base[1]),
        (loaded["pair"].first, base[2]),
        (loaded["ordered"]["a"], base[:, 0]),
        (loaded["output"].logits, base[:2]),
    ]:
        assert torch.equal(got, want) and storage_bytes(got) == got.numel() * 4


def test_unchanged_containers_are_not_copied() -> None:
    value = {"t": torch.ones(3), "nested": [torch.zeros(2), {"k": 1}]}
    assert compact(value) is value


def test_shared_and_cyclic_values() -> None:
    view = torch.randn(10)[2:4]
    cyclic: list = [view]
    cyclic.append(cyclic)
    out = compact({"a": view, "b": view, "c": cyclic})
    assert out["a"] is out["b"]  # one saved tensor under two names stays one tensor
    assert out["c"][0] is out["a"]


def test_expanded_tensors_are_left_alone() -> None:
    expanded = torch.ones(1, 4).expand(1000, 4)
    assert compact(expanded) is expanded


def test_compressed_result_records_its_content_size() -> None:
    value = {"t": torch.arange(100.0)}
    raw = encode_result(value, compress=False)
    packed = encode_result(value, compress=True)
    assert zstandard.frame_content_size(packed) == len(raw)
    assert torch.equal(client_load(packed, compress=True)["t"], value["t"])
