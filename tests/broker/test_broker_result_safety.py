"""A site that returns a pickled object instead of plain data is refused; no client loads it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
import zstandard
from broker_fakes import GPT2_KEY, happy, saved
from nnsight.intervention.backends.remote import RemoteError
from nnsight.schema.request import RequestModel
from test_broker_nnsight_client import CannedBackend, serve  # noqa: F401 - fixture

from broker.result_safety import (
    IN_MEMORY_MAX_BYTES,
    UnsafeResult,
    check_result_bytes,
    check_result_file,
    checkable_in_memory,
)


class Gadget:
    """What a compromised site could send: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write(tmp_path: Path, data: bytes, compress: bool) -> Path:
    path = tmp_path / "result"
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)
    return path


def check(tmp_path: Path, data: bytes, compress: bool, how: str, site: str = "site-a") -> None:
    """The broker's check, as it runs on a file (URL results) or in memory (inline ones)."""
    if how == "file":
        check_result_file(write(tmp_path, data, compress), compress, site)
        return
    blob = zstandard.ZstdCompressor().compress(data) if compress else data
    assert checkable_in_memory(blob, compress)
    check_result_bytes(blob, compress, site)


HOW = pytest.mark.parametrize("how", ["file", "memory"])


@HOW
@pytest.mark.parametrize("compress", [True, False])
def test_plain_results_pass(tmp_path, compress, how) -> None:
    data = saved({"h": torch.ones(2, 3), "ids": [1, 2], "meta": {"n": 3, "name": "x"}})
    check(tmp_path, data, compress, how)


@HOW
@pytest.mark.parametrize("compress", [True, False])
def test_a_gadget_is_refused_naming_the_site_and_nothing_runs(tmp_path, compress, how) -> None:
    marker = tmp_path / "pwned"
    data = saved({"x": torch.ones(2), "y": Gadget(marker)})
    with pytest.raises(UnsafeResult) as info:
        check(tmp_path, data, compress, how)
    assert "site site-a" in info.value.message
    assert "posix.system" in info.value.message or "system" in info.value.message
    assert not marker.exists()


@HOW
def test_not_a_dict_or_not_a_result_is_refused(tmp_path, how) -> None:
    with pytest.raises(UnsafeResult, match="not a dict"):
        check(tmp_path, saved([torch.ones(1)]), False, how, "s")
    with pytest.raises(UnsafeResult):
        check(tmp_path, b"garbage" * 10, False, how, "s")
    with pytest.raises(UnsafeResult, match="zstd"):
        check_result_file(write(tmp_path, b"garbage" * 10, False), True, "s")


def test_only_small_results_of_known_size_are_checked_in_memory() -> None:
    small = saved({"x": torch.ones(4)})
    assert checkable_in_memory(small, False)
    assert checkable_in_memory(zstandard.ZstdCompressor().compress(small), True)
    assert not checkable_in_memory(b"garbage" * 10, True)  # not zstd: the file check refuses it
    streamed = zstandard.ZstdCompressor().compressobj()
    unsized = streamed.compress(small) + streamed.flush()  # a frame that hides its size
    assert not checkable_in_memory(unsized, True)
    bomb = zstandard.ZstdCompressor().compress(bytes(IN_MEMORY_MAX_BYTES + 1))  # ~2 KiB of zstd
    assert len(bomb) < 64 * 1024 and not checkable_in_memory(bomb, True)


@pytest.mark.parametrize("inline_max_bytes", [8 * 1024 * 1024, 0], ids=["inline", "url"])
def test_client_gets_an_error_and_never_loads_the_gadget(
    serve,  # noqa: F811
    sites,
    tmp_path,
    inline_max_bytes,
) -> None:
    marker = tmp_path / "pwned-client"
    evil = io.BytesIO()
    torch.save({"x": Gadget(marker)}, evil)
    sites.scripts["site-a"] = lambda request: happy(evil.getvalue())
    url = serve(inline_max_bytes=inline_max_bytes)
    backend = CannedBackend(GPT2_KEY, host=url, api_key="alice-token")
    backend.compress = False
    with pytest.raises(RemoteError, match="refused and not delivered"):
        backend.request(RequestModel(model_key=GPT2_KEY, compress=False), None)
    assert not marker.exists()
