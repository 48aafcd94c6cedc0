"""The job-thread seccomp filter (sandbox layer 3), exercised on real threads of this process.

Each test contains a fresh thread (filters are per thread and irreversible) and checks what
it can and cannot do, and that the rest of the process stays free.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from site_agent.containment import contain_thread, is_contained, probe

pytestmark = pytest.mark.skipif(not probe().available, reason="no seccomp on this machine")


def in_contained_thread(fn: Callable[[], object]) -> object:
    """Run `fn` on a new contained thread; its result, or the exception it raised."""
    box: list[object] = []

    def body() -> None:
        contain_thread()
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return box[0]


def test_the_probe_finds_seccomp_here() -> None:
    assert probe().available


def test_a_contained_thread_cannot_open_a_socket() -> None:
    assert isinstance(in_contained_thread(socket.socket), PermissionError)


def test_nor_connect_to_localhost_through_a_socket_made_before() -> None:
    sock = socket.socket()
    try:
        got = in_contained_thread(lambda: sock.connect(("127.0.0.1", 9)))
        assert isinstance(got, PermissionError)
    finally:
        sock.close()


def test_a_contained_thread_cannot_fork_or_spawn(tmp_path: Path) -> None:
    assert isinstance(in_contained_thread(os.fork), PermissionError)
    marker = tmp_path / "ran"
    status = in_contained_thread(lambda: os.system(f"touch {marker}"))
    assert status != 0 and not marker.exists()
    got = in_contained_thread(lambda: subprocess.run(["true"], check=False))
    assert isinstance(got, PermissionError)
    assert isinstance(in_contained_thread(lambda: os.execv("/bin/true", ["true"])), OSError)


def test_a_contained_thread_cannot_signal_other_processes() -> None:
    assert isinstance(in_contained_thread(lambda: os.kill(1, 0)), PermissionError)
    assert in_contained_thread(lambda: os.kill(os.getpid(), 0)) is None  # itself: fine


@pytest.mark.parametrize("mode", ["w", "a", "r+", "x"])
def test_a_contained_thread_cannot_write_files(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"original")
    name = target if mode != "x" else tmp_path / "new.bin"
    assert isinstance(in_contained_thread(lambda: open(name, mode)), PermissionError)  # noqa: SIM115
    assert target.read_bytes() == b"original"
    for call in (lambda: target.unlink(), lambda: target.rename(tmp_path / "moved")):
        assert isinstance(in_contained_thread(call), PermissionError)
    assert isinstance(in_contained_thread(lambda: (tmp_path / "d").mkdir()), PermissionError)


def test_a_contained_thread_reads_files_and_runs_torch(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("hello")
    assert in_contained_thread(lambda: (tmp_path / "data").read_text()) == "hello"
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    assert torch.equal(in_contained_thread(lambda: a @ b), a @ b)


def test_threads_started_by_a_contained_thread_are_contained_too() -> None:
    def start_child() -> bool:
        seen: list[bool] = []
        child = threading.Thread(target=lambda: seen.append(is_contained()))
        child.start()
        child.join()
        return seen[0]

    assert in_contained_thread(start_child) is True


def test_torch_intra_op_threads_work_under_the_filter() -> None:
    before = torch.get_num_threads()
    try:

        def parallel() -> torch.Tensor:
            torch.set_num_threads(2)
            return torch.randn(512, 512, generator=torch.Generator().manual_seed(0)).sum(0)

        got = in_contained_thread(parallel)
        assert isinstance(got, torch.Tensor) and got.shape == (512,)
    finally:
        torch.set_num_threads(before)


def test_other_threads_stay_free(tmp_path: Path) -> None:
    assert in_contained_thread(is_contained) is True
    assert not is_contained()
    (tmp_path / "free").write_text("main thread writes")
    socket.socket().close()
