"""Result safety: nothing reaches a researcher unless it loads under `weights_only=True`.

The nnsight client loads results with `torch.load(weights_only=False)`, so a compromised site
could run code on every researcher's machine through a pickled result (spec §12). The broker
therefore checks every result before it is offered, inline or by URL: the bytes must load with
torch's restricted unpickler (tensors, containers, primitives). The check loads onto the `meta`
device, so tensor data is never read: a 1 GiB result is checked in about a millisecond.
Compressed results are first decompressed to a temporary file in a stream; a small result
the broker holds in memory anyway (one it sends inline) is checked there, with no file.
"""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path

import zstandard

from edif.errors import EdifError


class UnsafeResult(EdifError):
    """A site sent a result that is not plain data; it is refused and never offered."""

    http_status = 502
    grpc_code = "DATA_LOSS"


_GLOBAL = re.compile(r"(?:Unsupported global|GLOBAL) ?:? ?(?:GLOBAL )?([\w.]+)")


def check_result_file(path: Path, compressed: bool, site: str) -> None:
    """Raise `UnsafeResult` unless the result at `path` is plain data."""
    if not compressed:
        _check_plain(path, site)
        return
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".check") as plain:
        try:
            with path.open("rb") as source:
                zstandard.ZstdDecompressor().copy_stream(source, plain)
        except zstandard.ZstdError as exc:
            raise UnsafeResult(_refusal(site, f"it is not valid zstd ({exc})")) from exc
        plain.flush()
        _check_plain(Path(plain.name), site)


IN_MEMORY_MAX_BYTES = 64 * 1024 * 1024  # the most a check decompresses into memory


def checkable_in_memory(data: bytes, compressed: bool) -> bool:
    """Whether `check_result_bytes` may take `data`: its plain form is small and known.

    A zstd frame that does not state its content size (the client could not load it either)
    or states a large one is checked through a file, so a small frame never becomes a large
    allocation."""
    if not compressed:
        return len(data) <= IN_MEMORY_MAX_BYTES
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        return False  # not zstd: the file check says so, with the usual refusal
    return 0 <= size <= IN_MEMORY_MAX_BYTES


def check_result_bytes(data: bytes, compressed: bool, site: str) -> None:
    """`check_result_file` for a result in memory (see `checkable_in_memory`)."""
    if compressed:
        try:
            data = zstandard.ZstdDecompressor().decompress(data)
        except zstandard.ZstdError as exc:
            raise UnsafeResult(_refusal(site, f"it is not valid zstd ({exc})")) from exc
    _check_plain(io.BytesIO(data), site)


def _check_plain(source: Path | io.BytesIO, site: str) -> None:
    import torch

    try:
        result = torch.load(source, weights_only=True, map_location="meta")
    except Exception as exc:  # noqa: BLE001 - every failure to load as plain data is a refusal
        raise UnsafeResult(_refusal(site, _reason(exc))) from exc
    if not isinstance(result, dict):
        raise UnsafeResult(_refusal(site, f"it is a {type(result).__name__}, not a dict of saves"))


def _reason(exc: Exception) -> str:
    match = _GLOBAL.search(str(exc))
    if match:
        return f"it contains {match.group(1)}, which is not a tensor, container or primitive"
    return f"it does not load as plain data ({type(exc).__name__})"


def _refusal(site: str, why: str) -> str:
    return (
        f"The result from site {site} was refused and not delivered: {why}. Only tensors, "
        "containers and primitives may be saved; the site has been reported to the operators."
    )
