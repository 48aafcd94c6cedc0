"""proto.chunks: result chunks written and read without protobuf's copies, byte-for-byte the
same wire format as protobuf's, with protobuf's parser for everything else."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proto import site_agent_pb2 as pb
from proto.chunks import ChunkUpdate, parse_update, serialize_update


def protobuf_bytes(data: bytes) -> bytes:
    return pb.ExecuteUpdate(chunk=pb.ResultChunk(data=data)).SerializeToString()


@given(st.binary(max_size=4096))
def test_chunks_are_written_as_protobuf_writes_them(data: bytes) -> None:
    assert serialize_update(ChunkUpdate(data)) == protobuf_bytes(data)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 2_097_151, 8 * 1024 * 1024])
def test_sizes_at_varint_boundaries(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    raw = protobuf_bytes(data)
    assert serialize_update(ChunkUpdate(data)) == raw
    parsed = parse_update(raw)
    assert isinstance(parsed, ChunkUpdate)
    assert bytes(parsed.chunk.data) == data


def test_a_read_only_array_is_written_like_its_bytes() -> None:
    """The worker's chunks reach the agent as read-only uint8 arrays over Ray's object store."""
    data = bytes(range(200)) * 50
    array = np.frombuffer(data, dtype=np.uint8)
    assert serialize_update(ChunkUpdate(array)) == protobuf_bytes(data)


@given(st.binary(max_size=4096))
def test_a_parsed_chunk_views_the_received_bytes(data: bytes) -> None:
    raw = protobuf_bytes(data)
    parsed = parse_update(raw)
    assert parsed.WhichOneof("update") == "chunk"
    assert parsed.HasField("chunk") and not parsed.HasField("done")
    assert isinstance(parsed.chunk.data, memoryview)
    assert parsed.chunk.data.obj is raw  # a view, not a copy
    assert parsed.chunk.data == data
    assert parsed.to_message() == pb.ExecuteUpdate.FromString(raw)


@pytest.mark.parametrize(
    "message",
    [
        pb.ExecuteUpdate(status=pb.StatusUpdate(phase=pb.RUNNING, description="running")),
        pb.ExecuteUpdate(log=pb.LogLine(text="hello")),
        pb.ExecuteUpdate(done=pb.ResultEnd(total_bytes=3, sha256="ab")),
        pb.ExecuteUpdate(error=pb.JobError(kind=pb.USER, description="boom")),
        pb.ExecuteUpdate(),
    ],
)
def test_other_updates_go_through_protobuf(message: pb.ExecuteUpdate) -> None:
    raw = serialize_update(message)
    assert raw == message.SerializeToString()
    parsed = parse_update(raw)
    assert isinstance(parsed, pb.ExecuteUpdate)
    assert parsed == message


def test_a_chunk_with_more_than_its_data_is_left_to_protobuf() -> None:
    """Unknown fields (a newer agent) or a repeated data field: protobuf's parser decides."""
    inner = pb.ResultChunk(data=b"abc").SerializeToString() + b"\x10\x05"  # + field 2 varint
    raw = bytes((0x1A, len(inner))) + inner
    parsed = parse_update(raw)
    assert isinstance(parsed, pb.ExecuteUpdate)
    assert parsed.chunk.data == b"abc"


@given(st.binary(max_size=64))
def test_any_bytes_starting_like_a_chunk_parse_as_protobuf_would(tail: bytes) -> None:
    raw = b"\x1a" + tail
    try:
        expected = pb.ExecuteUpdate.FromString(raw)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, whatever its class
        with pytest.raises(type(exc)):
            parse_update(raw)
        return
    parsed = parse_update(raw)
    if isinstance(parsed, ChunkUpdate):
        parsed = parsed.to_message()
    assert parsed == expected
