"""The result chunks of the `Execute` stream, written and read without protobuf's copies.

Why: a result crosses the site agent and the broker as `ExecuteUpdate{chunk: ResultChunk{data}}`
messages (8 MiB each by default). Through protobuf every chunk is copied on each side more
than once: the agent copies Ray's buffer into `bytes`, then into the message, then into the
serialized form; the broker's parse copies it into the message, and every read of
`.chunk.data` copies it again (upb hands out a new `bytes` each time; the broker read it
twice, once for telemetry). On 2 cores those copies of a 1 GiB result are CPU that the rest of
the path waits for (docs/benchmarks.md, section 2).

Flow:
- agent: `ChunkUpdate(data)` stands in for the message (any buffer: `bytes`, or the worker's
  read-only array over Ray's object store); `serialize_update` writes it as the exact bytes
  protobuf would write (field 3, length-delimited, holding field 1), with one copy;
- broker: `parse_update` recognises exactly that shape and returns a `ChunkUpdate` whose data
  is a `memoryview` into the received message (no copy, the same view on every read);
  anything else, or anything unexpected in a chunk, goes to protobuf's own parser, so the
  wire format is protobuf's, and either end may be a plain protobuf peer.

`ChunkUpdate` answers the two questions the code asks of updates (`WhichOneof("update")`,
`HasField(name)`) and has `.chunk.data`, so the code that relays updates needs no branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from proto import site_agent_pb2 as pb

SERVICE = "edif.v1.SiteAgent"
EXECUTE_METHOD = f"/{SERVICE}/Execute"

_CHUNK_TAG = 3 << 3 | 2  # ExecuteUpdate.chunk: field 3, length-delimited
_DATA_TAG = 1 << 3 | 2  # ResultChunk.data: field 1, length-delimited


@dataclass(frozen=True)
class _Chunk:
    data: Any  # bytes, memoryview or a 1-D uint8 array: anything with the buffer protocol


class ChunkUpdate:
    """An `ExecuteUpdate` that carries one result chunk; see the module doc."""

    __slots__ = ("chunk",)

    def __init__(self, data: Any) -> None:
        self.chunk = _Chunk(data)

    def WhichOneof(self, group: str) -> str:  # noqa: N802 - protobuf's spelling
        if group != "update":
            raise ValueError(f"ExecuteUpdate has no oneof {group!r}")
        return "chunk"

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's spelling
        return name == "chunk"

    def to_message(self) -> pb.ExecuteUpdate:
        return pb.ExecuteUpdate(chunk=pb.ResultChunk(data=bytes(self.chunk.data)))


Update = pb.ExecuteUpdate | ChunkUpdate


def serialize_update(update: Update) -> bytes:
    """The wire bytes of `update`: protobuf's own for messages, built directly for chunks."""
    if not isinstance(update, ChunkUpdate):
        return update.SerializeToString()
    data = memoryview(update.chunk.data).cast("B")
    if not len(data):
        return bytes((_CHUNK_TAG, 0))  # proto3 leaves an empty `data` out
    inner = bytes((_DATA_TAG,)) + _varint(len(data))
    return b"".join((bytes((_CHUNK_TAG,)), _varint(len(inner) + len(data)), inner, data))


def parse_update(raw: bytes) -> Update:
    """`raw` as an update: a `ChunkUpdate` viewing `raw` for the plain chunk shape, else the
    protobuf message."""
    view = memoryview(raw)
    if view[:1] == bytes((_CHUNK_TAG,)):
        data = _chunk_data(view)
        if data is not None:
            return ChunkUpdate(data)
    return pb.ExecuteUpdate.FromString(raw)


def add_servicer(servicer: Any, server: grpc.aio.Server) -> None:
    """`site_agent_pb2_grpc.add_SiteAgentServicer_to_server`, with `Execute`'s updates written
    by `serialize_update` (so the servicer may yield `ChunkUpdate`s)."""
    handlers = {
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=pb.DescribeRequest.FromString,
            response_serializer=pb.SiteDescription.SerializeToString,
        ),
        "Execute": grpc.unary_stream_rpc_method_handler(
            servicer.Execute,
            request_deserializer=pb.ExecuteRequest.FromString,
            response_serializer=serialize_update,
        ),
        "Cancel": grpc.unary_unary_rpc_method_handler(
            servicer.Cancel,
            request_deserializer=pb.CancelRequest.FromString,
            response_serializer=pb.CancelReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _chunk_data(view: memoryview) -> memoryview | None:
    """The `data` bytes of a message that is exactly one chunk holding exactly its data."""
    outer = _read_varint(view, 1)
    if outer is None or outer[0] != len(view) - outer[1]:
        return None
    start = outer[1]
    if start == len(view):
        return view[start:]  # an empty chunk
    if view[start] != _DATA_TAG:
        return None
    inner = _read_varint(view, start + 1)
    if inner is None or inner[0] != len(view) - inner[1]:
        return None
    return view[inner[1] :]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None if the varint is cut off or longer than 10 bytes."""
    value = shift = 0
    for index in range(pos, min(pos + 10, len(view))):
        byte = view[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    return None
