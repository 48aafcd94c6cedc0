"""site_agent.chunking: a result cut into chunks while torch.save writes it, and the bound on
chunks waiting for Ray."""

import hashlib
import io
import threading
import time

import torch
from hypothesis import given
from hypothesis import strategies as st

from site_agent.chunking import ChunkCutter, InFlight
from site_agent.encoding import encode_result, stream_result


def cut(pieces: list[bytes], size: int) -> tuple[list[bytes], ChunkCutter]:
    chunks: list[bytes] = []
    cutter = ChunkCutter(size, lambda buf: chunks.append(bytes(buf)), InFlight(limit=10**6))
    for piece in pieces:
        assert cutter.write(piece) == len(piece)
    cutter.close()
    return chunks, cutter


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 64))
def test_chunks_are_full_but_the_last_and_add_up(pieces: list[bytes], size: int) -> None:
    chunks, cutter = cut(pieces, size)
    whole = b"".join(pieces)
    assert b"".join(chunks) == whole
    assert all(len(c) == size for c in chunks[:-1])
    assert all(0 < len(c) <= size for c in chunks)
    assert cutter.total == len(whole)
    assert cutter.sha256 == hashlib.sha256(whole).hexdigest()


def test_an_empty_result_sends_no_chunk() -> None:
    chunks, cutter = cut([], 8)
    assert chunks == [] and cutter.total == 0


def test_streamed_encoding_is_byte_for_byte_the_buffered_one() -> None:
    hidden = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    result = {"last": hidden[:, -1, :], "whole": hidden, "ids": [1, 2], "n": 3}
    out = io.BytesIO()
    stream_result(result, out.write)
    assert out.getvalue() == encode_result(result, compress=False)


def test_the_cutter_waits_for_a_free_slot() -> None:
    in_flight = InFlight(limit=2, wait_s=30)
    sent: list[int] = []
    cutter = ChunkCutter(1, lambda buf: sent.append(buf[0]), in_flight)
    writer = threading.Thread(target=cutter.write, args=(bytes(range(5)),))
    writer.start()
    for count in (2, 3, 4, 5):
        expected = list(range(count))
        wait_for(lambda count=count: len(sent) >= count)
        time.sleep(0.05)  # a cutter that did not wait would have sent more by now
        assert sent == expected  # two in flight: the next one waits for a leave()
        in_flight.leave()
    writer.join(10)
    assert not writer.is_alive()


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert condition()


def test_a_stalled_consumer_slows_the_cutter_but_never_hangs_it() -> None:
    in_flight = InFlight(limit=1, wait_s=0.05)
    sent: list[int] = []
    cutter = ChunkCutter(1, lambda buf: sent.append(buf[0]), in_flight)
    cutter.write(bytes(range(4)))  # nobody ever calls leave()
    assert sent == [0, 1, 2, 3]


def test_once_the_reader_is_gone_the_cutter_never_waits() -> None:
    in_flight = InFlight(limit=1, wait_s=60)
    sent: list[int] = []
    cutter = ChunkCutter(1, lambda buf: sent.append(buf[0]), in_flight)
    cutter.write(b"\x00")
    in_flight.close()  # the worker's generator was closed: no leave() will come
    writer = threading.Thread(target=cutter.write, args=(bytes(range(1, 4)),))
    writer.start()
    writer.join(10)
    assert not writer.is_alive() and sent == [0, 1, 2, 3]
