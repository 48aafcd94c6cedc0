"""Encode a request's result dict into the bytes the client loads (spec §5.2).

Flow: compact views (below), `torch.save` with pickle protocol 2, then, if and only if the
request was compressed, one-shot zstd. The client reads the result with
`zstandard.ZstdDecompressor().decompress`, which needs the content size in the frame header;
only the one-shot `ZstdCompressor.compress` writes it (a streaming compressor does not).

Compaction: `torch.save` writes a tensor's whole storage, so a saved
`h.output[:, -1, :]` (a view) would carry every position of `h`. Any tensor whose storage
is larger than its own elements is cloned first, recursively through dicts, lists and tuples.
Containers are rebuilt only when something inside them changed, keeping their types.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import torch
import zstandard

ZSTD_LEVEL = 3


def encode_result(result: dict, compress: bool) -> bytes:
    """The wire bytes for `result`: `torch.save` of its compacted copy, zstd'd if `compress`."""
    buffer = io.BytesIO()
    # Protocol 2 (torch's default): the broker re-checks every result with torch's weights_only
    # unpickler, which refuses protocol 4's FRAME opcode.
    torch.save(compact(result), buffer, pickle_protocol=2)
    data = buffer.getvalue()
    if compress:
        data = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    return data


def stream_result(result: dict, write: Callable[[memoryview], Any]) -> None:
    """`encode_result(result, compress=False)`, byte for byte, handed to `write` piece by piece
    as `torch.save` writes it (site_agent/chunking.py)."""
    torch.save(compact(result), _Writer(write), pickle_protocol=2)


class _Writer(io.RawIOBase):
    def __init__(self, write: Callable[[memoryview], Any]) -> None:
        self._write = write

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._write(view)
        return view.nbytes


def compact(value: Any) -> Any:
    """`value` with every oversized tensor view replaced by a tight copy; see module doc."""
    return _compact(value, {})


def _compact(value: Any, memo: dict[int, Any]) -> Any:
    key = id(value)
    if key in memo:
        # Shared objects stay shared (one tensor saved under two names is cloned once), and a
        # container that contains itself is returned as is instead of recursing forever.
        return memo[key]
    if isinstance(value, torch.Tensor):
        memo[key] = _compact_tensor(value)
    elif isinstance(value, dict | list | tuple):
        memo[key] = value
        memo[key] = _compact_container(value, memo)
    else:
        return value
    return memo[key]


def _compact_tensor(tensor: torch.Tensor) -> torch.Tensor:
    if not _is_oversized_view(tensor):
        return tensor
    copied = tensor.detach().clone()
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(copied, requires_grad=tensor.requires_grad)
    return copied.requires_grad_(tensor.requires_grad)


def _is_oversized_view(tensor: torch.Tensor) -> bool:
    # Only plain dense tensors have one storage whose size can be compared; leave sparse,
    # quantized, nested and meta tensors (and other subclasses) to torch.save as they are.
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        return False
    if tensor.is_meta:
        return False
    own = tensor.numel() * tensor.element_size()
    return tensor.untyped_storage().nbytes() > own


def _compact_container(value: dict | list | tuple, memo: dict[int, Any]) -> Any:
    if isinstance(value, dict):
        changed = {k: new for k, v in value.items() if (new := _compact(v, memo)) is not v}
        return _rebuild_dict(value, changed) if changed else value
    items = [_compact(item, memo) for item in value]
    if all(new is old for new, old in zip(items, value, strict=True)):
        return value
    if isinstance(value, list):
        return _rebuild_list(value, items)
    return _rebuild_tuple(value, items)


def _rebuild_dict(value: dict, changed: dict) -> dict:
    if type(value) is dict:
        return {**value, **changed}
    # A shallow copy keeps the subclass and its attributes (OrderedDict, transformers'
    # ModelOutput, whose __setitem__ also updates the matching attribute).
    rebuilt = copy.copy(value)
    for k, v in changed.items():
        rebuilt[k] = v
    return rebuilt


def _rebuild_list(value: list, items: list) -> list:
    if type(value) is list:
        return items
    rebuilt = copy.copy(value)
    rebuilt[:] = items
    return rebuilt


def _rebuild_tuple(value: tuple, items: list) -> Any:
    if type(value) is tuple:
        return tuple(items)
    if hasattr(value, "_make"):  # a namedtuple
        return type(value)._make(items)
    try:
        return type(value)(items)
    except Exception:  # a tuple subclass with another constructor: send it uncompacted
        return value
