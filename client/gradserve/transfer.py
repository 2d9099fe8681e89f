"""Chunked tensor transfer: a header with tensor descriptors (small tensors inline), then 1 MiB
chunks of the large ones. Used by both ends for every RPC that carries tensors.

Why chunks rather than one big message: gRPC holds a whole message in memory several times and
caps its size; a 400 MB model as a stream of 1 MiB chunks never exceeds the 8 MiB message limit
both ends set, and the receiver copies each chunk straight into a buffer preallocated from the
header's dtype and shape.

Chunk framing lives here too. A chunk message (`oneof part { header = 1; chunk = 2 }` holding a
TensorChunk) is written and read by hand rather than through protobuf: protobuf copies the bytes
into the message, again into the wire bytes, and on receipt into its arena and once more into a
Python `bytes` per `.data` access -- about three copies of every MiB on each side where one is
enough. The hand-written frame is byte for byte what protobuf writes for the same message (fields
in number order, defaults omitted), so any protobuf peer reads it, and frames protobuf writes in
any other valid layout are parsed by protobuf itself. Headers always go through protobuf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

import numpy as np
from google.protobuf import message_factory

from gradserve.v1 import tensor_pb2

from .codec import TensorFormatError, decode_tensor, tensor_nbytes, wire_array

__all__ = [
    "MAX_MESSAGE_BYTES",
    "CHUNK_BYTES",
    "INLINE_TENSOR_BYTES",
    "INLINE_HEADER_BYTES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "Chunk",
    "OutgoingTensors",
    "TensorAssembler",
    "read_messages",
    "encode_chunk_frame",
    "decode_chunk_frame",
    "PartCodec",
    "RpcCodec",
    "rpc_codecs",
]

MAX_MESSAGE_BYTES = 8 << 20  # gRPC send/receive limit on both ends (documented in service.proto)
CHUNK_BYTES = 1 << 20  # bytes per TensorChunk
INLINE_TENSOR_BYTES = 1 << 20  # a tensor larger than this is always chunked
INLINE_HEADER_BYTES = 4 << 20  # inline bytes of one header; later tensors are chunked
DEFAULT_MAX_REQUEST_BYTES = 2 << 30  # total tensor bytes of one request (service default)


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


class OutgoingTensors:
    """Named arrays split into header entries and the chunks that follow the header."""

    def __init__(self, arrays: Mapping[str, object]):
        self.entries: list[tensor_pb2.NamedTensor] = []
        self._chunked: list[tuple[int, memoryview]] = []
        inline_bytes = 0
        for name, array in arrays.items():
            try:
                array = wire_array(array)
            except TensorFormatError as bad:
                raise TensorFormatError(bad.message, field=name) from None
            entry = tensor_pb2.NamedTensor(name=name)
            entry.tensor.dtype = array.dtype.name
            entry.tensor.shape.extend(array.shape)
            chunk = array.nbytes > INLINE_TENSOR_BYTES or inline_bytes + array.nbytes > INLINE_HEADER_BYTES
            if chunk:
                entry.chunked = True
                self._chunked.append((len(self.entries), memoryview(array.reshape(-1)).cast("B")))
            else:
                entry.tensor.data = array.tobytes()
                inline_bytes += array.nbytes
            self.entries.append(entry)

    def chunks(self, wrap: Callable[..., object] | None = None) -> Iterator[object]:
        """Every chunk, in order: a `Chunk` view for streams serialized by `PartCodec` (the bytes
        are copied once, into the frame), or with `wrap` the protobuf message `wrap(chunk=...)`."""
        for index, raw in self._chunked:
            for offset in range(0, len(raw), CHUNK_BYTES):
                chunk = Chunk(index, offset, raw[offset : offset + CHUNK_BYTES])
                yield chunk if wrap is None else chunk.message(wrap)


class TensorAssembler:
    """Rebuilds the named arrays of one header from its inline tensors and the chunks that follow.

    Everything is checked from the header alone (names, dtypes, shapes, total size) before any
    buffer is allocated; chunks must fill each buffer in order, without gaps or overlap.
    """

    def __init__(self, entries: Iterable[tensor_pb2.NamedTensor], max_total_bytes: int):
        self.arrays: dict[str, np.ndarray] = {}
        self._buffers: list[np.ndarray | None] = []  # flat uint8 views of chunked tensors
        self._received: list[int] = []
        self._missing = 0  # chunked tensors not yet complete
        total = 0
        for entry in entries:
            name = entry.name
            if not name:
                raise TensorFormatError("every tensor needs a name", field=f"tensors[{len(self._buffers)}]")
            if name in self.arrays:
                raise TensorFormatError("tensor sent twice", field=name)
            dtype, shape, nbytes = tensor_nbytes(entry.tensor, name, max_total_bytes - total)
            total += nbytes
            if entry.chunked:
                if entry.tensor.data:
                    raise TensorFormatError("a chunked tensor carries no inline data", field=name)
                array = np.empty(shape, dtype=dtype)
                self._buffers.append(array.reshape(-1).view(np.uint8))
                self._missing += nbytes > 0
            else:
                array = decode_tensor(entry.tensor, name, max_total_bytes)
                self._buffers.append(None)
            self._received.append(0)
            self.arrays[name] = array
        self._names = list(self.arrays)

    @property
    def complete(self) -> bool:
        return self._missing == 0

    def add(self, chunk: Chunk | tensor_pb2.TensorChunk) -> None:
        index = chunk.index
        if index >= len(self._buffers) or self._buffers[index] is None:
            raise TensorFormatError(f"chunk for tensor index {index}, which is not chunked", field="chunk.index")
        buffer, name = self._buffers[index], self._names[index]
        start = self._received[index]
        if chunk.offset != start:
            raise TensorFormatError(f"chunk at offset {chunk.offset}, expected {start}", field=name)
        data = chunk.data
        end = start + len(data)
        if end > len(buffer) or not data:
            raise TensorFormatError(
                f"chunk of {len(data)} bytes at {start} does not fit the {len(buffer)} bytes declared", field=name
            )
        buffer[start:end] = np.frombuffer(data, dtype=np.uint8)
        self._received[index] = end
        if end == len(buffer):
            self._missing -= 1

    def check_complete(self) -> None:
        for index, buffer in enumerate(self._buffers):
            if buffer is not None and self._received[index] != len(buffer):
                raise TensorFormatError(
                    f"stream ended after {self._received[index]} of {len(buffer)} bytes", field=self._names[index]
                )


def read_messages(
    messages: Iterator, max_total_bytes: int, *, single: bool
) -> Iterator[tuple[object, dict[str, np.ndarray]]]:
    """(header, arrays) for each header of a `oneof part {header, chunk}` stream, once complete.

    `single`: the stream holds exactly one header (anything after its last chunk is an error).
    """
    pending = None  # (header, assembler) while chunks are outstanding
    seen_header = False
    for message in messages:
        part = "chunk" if type(message) is Chunk else message.WhichOneof("part")
        if part == "header":
            if pending is not None:
                pending[1].check_complete()
            if single and seen_header:
                raise TensorFormatError("a second header in a single-request stream", field="header")
            seen_header = True
            header = message.header
            assembler = TensorAssembler(header.tensors, max_total_bytes)
            if assembler.complete:
                yield header, assembler.arrays
            else:
                pending = (header, assembler)
        elif part == "chunk":
            if pending is None:
                raise TensorFormatError("a chunk with no tensor waiting for it", field="chunk")
            pending[1].add(message if type(message) is Chunk else message.chunk)
            if pending[1].complete:
                header, assembler = pending
                pending = None
                yield header, assembler.arrays
        else:
            raise TensorFormatError("empty message: neither header nor chunk", field="part")
    if pending is not None:
        pending[1].check_complete()
    if single and not seen_header:
        raise TensorFormatError("the stream carried no header", field="header")


# ----- chunk framing ----------------------------------------------------------------------------

PART_CHUNK_FIELD = 2  # every `oneof part` message holds its TensorChunk in field 2 (service.proto)
_VARINT, _LEN = 0, 2  # protobuf wire types
_CHUNK_FIELDS = tensor_pb2.TensorChunk.DESCRIPTOR.fields_by_name
_INDEX_KEY = _CHUNK_FIELDS["index"].number << 3 | _VARINT
_OFFSET_KEY = _CHUNK_FIELDS["offset"].number << 3 | _VARINT
_DATA_KEY = _CHUNK_FIELDS["data"].number << 3 | _LEN
_PART_CHUNK_KEY = PART_CHUNK_FIELD << 3 | _LEN


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


class RpcCodec(NamedTuple):
    """One method of a service: its path, streaming kind and wire (de)serializers."""

    path: str
    request_streaming: bool
    response_streaming: bool
    request_serializer: Callable
    request_deserializer: Callable
    response_serializer: Callable
    response_deserializer: Callable


def rpc_codecs(service) -> dict[str, RpcCodec]:
    """{method name: RpcCodec} for a service descriptor: PartCodec for messages with a
    `oneof part` holding a TensorChunk, the generated protobuf (de)serializers for the rest.
    The SDK's stub and the gateway's handlers are both built from this table."""
    return {
        method.name: RpcCodec(
            f"/{service.full_name}/{method.name}", method.client_streaming, method.server_streaming,
            *_message_codec(method.input_type), *_message_codec(method.output_type),
        )
        for method in service.methods
    }


def _message_codec(descriptor) -> tuple[Callable, Callable]:
    message_class = message_factory.GetMessageClass(descriptor)
    part = descriptor.oneofs_by_name.get("part")
    if part is not None and any(field.name == "chunk" for field in part.fields):
        codec = PartCodec(message_class)
        return codec.serialize, codec.deserialize
    return message_class.SerializeToString, message_class.FromString
