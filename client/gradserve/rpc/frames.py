"""Chunk framing: `oneof part { header = 1; chunk = 2 }` messages holding a TensorChunk, written
and read by hand.

Protobuf would copy a chunk's bytes into the message, again into the wire bytes, and on receipt
into its arena and once more into a Python `bytes` per `.data` access -- about three copies of every
MiB on each side where one is enough. The hand-written frame is byte for byte what protobuf writes
for the same message (fields in number order, defaults omitted), so any protobuf peer reads it, and
frames protobuf writes in any other valid layout are parsed by protobuf itself. Headers always go
through protobuf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from gradserve.v1 import tensor_pb2

__all__ = ["PART_CHUNK_FIELD", "Chunk", "encode_chunk_frame", "decode_chunk_frame", "PartCodec"]

PART_CHUNK_FIELD = 2  # every `oneof part` message holds its TensorChunk in field 2 (service.proto)
_VARINT, _LEN = 0, 2  # protobuf wire types
_CHUNK_FIELDS = tensor_pb2.TensorChunk.DESCRIPTOR.fields_by_name
_INDEX_KEY = _CHUNK_FIELDS["index"].number << 3 | _VARINT
_OFFSET_KEY = _CHUNK_FIELDS["offset"].number << 3 | _VARINT
_DATA_KEY = _CHUNK_FIELDS["data"].number << 3 | _LEN
_PART_CHUNK_KEY = PART_CHUNK_FIELD << 3 | _LEN


class Chunk(NamedTuple):
    """One TensorChunk of a `part` message, its bytes a view (no copy) of the array being sent or
    of the frame received. Stands for `wrap(chunk=TensorChunk(...))` in message streams."""

    index: int
    offset: int
    data: memoryview | bytes

    def message(self, wrap: Callable[..., object]):
        """The same chunk as a protobuf message `wrap(chunk=TensorChunk)` (copies the bytes)."""
        return wrap(chunk=tensor_pb2.TensorChunk(index=self.index, offset=self.offset, data=bytes(self.data)))

    def ByteSize(self) -> int:  # noqa: N802 - the protobuf message method, for byte counters
        return len(_chunk_frame_head(self)) + len(self.data)


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"varint of negative {value}")
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); IndexError/ValueError on truncated or over-long varints."""
    value = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def _chunk_frame_head(chunk: Chunk) -> bytes:
    """The frame's bytes before the data. Field order and omitted zero fields are those of
    protobuf's own serializer, which is what makes the frames byte-identical to it."""
    fields = bytearray()
    if chunk.index:
        fields += _varint(_INDEX_KEY) + _varint(chunk.index)
    if chunk.offset:
        fields += _varint(_OFFSET_KEY) + _varint(chunk.offset)
    size = len(chunk.data)
    if size:
        fields += _varint(_DATA_KEY) + _varint(size)
    return _varint(_PART_CHUNK_KEY) + _varint(len(fields) + size) + bytes(fields)


def encode_chunk_frame(chunk: Chunk) -> bytes:
    """The wire bytes of `wrap(chunk=TensorChunk(index, offset, data))` for any `part` message
    type, equal to protobuf's SerializeToString; the data is copied once, into the result."""
    return b"".join((_chunk_frame_head(chunk), chunk.data))


def decode_chunk_frame(raw: bytes) -> Chunk | None:
    """The chunk a `part` message's wire bytes hold, its data a view into `raw` (no copy).

    None unless `raw` is a single chunk field whose fields are index, offset and data (each
    possibly repeated: the last wins, as in protobuf). Headers, unknown fields, several top-level
    fields to merge, out-of-range or malformed values are all left to protobuf's own parser.
    """
    try:
        key, pos = _read_varint(raw, 0)
        if key != _PART_CHUNK_KEY:
            return None
        size, pos = _read_varint(raw, pos)
        if pos + size != len(raw):
            return None
        index = offset = 0
        data = b""
        while pos < len(raw):
            key, pos = _read_varint(raw, pos)
            if key == _INDEX_KEY:
                index, pos = _read_varint(raw, pos)
            elif key == _OFFSET_KEY:
                offset, pos = _read_varint(raw, pos)
            elif key == _DATA_KEY:
                size, pos = _read_varint(raw, pos)
                if pos + size > len(raw):
                    return None
                data = memoryview(raw)[pos : pos + size]
                pos += size
            else:
                return None
    except (IndexError, ValueError):
        return None
    if index >= 1 << 32 or offset >= 1 << 64:
        return None  # protobuf truncates these; let it
    return Chunk(index, offset, data)


class PartCodec:
    """gRPC (de)serializer of one `oneof part { header = 1; chunk = 2 }` message type: `Chunk`s
    are written as hand-encoded frames and chunk frames are read as `Chunk` views; headers (and
    chunk messages built with protobuf) go through protobuf."""

    def __init__(self, message_class):
        chunk_field = message_class.DESCRIPTOR.fields_by_name.get("chunk")
        if chunk_field is None or chunk_field.number != PART_CHUNK_FIELD \
                or chunk_field.message_type is not tensor_pb2.TensorChunk.DESCRIPTOR:
            raise ValueError(f"{message_class.DESCRIPTOR.full_name} has no TensorChunk chunk = {PART_CHUNK_FIELD}")
        self.message_class = message_class

    def serialize(self, message) -> bytes:
        if type(message) is Chunk:
            return encode_chunk_frame(message)
        return message.SerializeToString()

    def deserialize(self, raw: bytes):
        chunk = decode_chunk_frame(raw)
        return self.message_class.FromString(raw) if chunk is None else chunk
