"""Chunked tensor transfer: a header with tensor descriptors (small tensors inline), then 1 MiB
chunks of the large ones. Used by both ends for every RPC that carries tensors.

Why chunks rather than one big message: gRPC holds a whole message in memory several times and
caps its size; a 400 MB model as a stream of 1 MiB chunks never exceeds the 8 MiB message limit
both ends set, and the receiver copies each chunk straight into a buffer preallocated from the
header's dtype and shape.

Chunk messages are framed by hand (`gradserve.rpc.frames`): each MiB is copied once per side.

A `StreamedTensor` is sent as it is produced: its descriptor from its dtype and shape, its chunks
from the parts it yields one after another (a table read out of the servers a range of rows at a
time), so the sender holds one part, never the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple
from dataclasses import dataclass

import numpy as np

from gradserve.rpc.frames import Chunk
from gradserve.v1 import tensor_pb2

from .codec import TensorFormatError, decode_tensor, tensor_nbytes, wire_array

__all__ = [
    "MAX_MESSAGE_BYTES",
    "CHUNK_BYTES",
    "INLINE_TENSOR_BYTES",
    "INLINE_HEADER_BYTES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "OutgoingTensors",
    "StreamedTensor",
    "Placement",
    "TensorAssembler",
    "read_messages",
]

MAX_MESSAGE_BYTES = 8 << 20  # gRPC send/receive limit on both ends (documented in service.proto)
CHUNK_BYTES = 1 << 20  # bytes per TensorChunk
INLINE_TENSOR_BYTES = 1 << 20  # a tensor larger than this is always chunked
INLINE_HEADER_BYTES = 4 << 20  # inline bytes of one header; later tensors are chunked
DEFAULT_MAX_REQUEST_BYTES = 2 << 30  # total tensor bytes of one request (service default)


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor of `dtype` and `shape` whose bytes are those of the arrays `parts()` yields, in
    order (C order; each part any number of leading-axis rows)."""

    dtype: np.dtype
    shape: tuple
    parts: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class OutgoingTensors:
    """Named arrays split into header entries and the chunks that follow the header; a
    `StreamedTensor` is always chunked, its parts taken only as its chunks are."""

    def __init__(self, arrays: Mapping[str, object]):
        self.entries: list[tensor_pb2.NamedTensor] = []
        self._chunked: list[tuple[int, memoryview | StreamedTensor]] = []
        inline_bytes = 0
        for name, array in arrays.items():
            if isinstance(array, StreamedTensor):
                self._chunked.append((len(self.entries), array))
                self.entries.append(_streamed_entry(name, array))
                continue
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
            pieces = _streamed_bytes(self.entries[index].name, raw) if isinstance(raw, StreamedTensor) else [(0, raw)]
            for start, piece in pieces:
                for offset in range(0, len(piece), CHUNK_BYTES):
                    chunk = Chunk(index, start + offset, piece[offset : offset + CHUNK_BYTES])
                    yield chunk if wrap is None else chunk.message(wrap)


def _streamed_entry(name: str, tensor: StreamedTensor) -> tensor_pb2.NamedTensor:
    try:
        dtype = wire_array(np.empty(0, dtype=tensor.dtype)).dtype
    except TensorFormatError as bad:
        raise TensorFormatError(bad.message, field=name) from None
    entry = tensor_pb2.NamedTensor(name=name, chunked=True)
    entry.tensor.dtype = dtype.name
    entry.tensor.shape.extend(int(extent) for extent in tensor.shape)
    return entry


def _streamed_bytes(name: str, tensor: StreamedTensor) -> Iterator[tuple[int, memoryview]]:
    """`(offset, bytes)` of each non-empty part; a part of another dtype or a total other than the
    shape's is the producer's error, raised before a wrong byte is sent."""
    dtype, offset = np.dtype(tensor.dtype), 0
    for part in tensor.parts():
        part = np.asarray(part)
        if part.dtype != dtype:
            raise TensorFormatError(f"a part of dtype {part.dtype}, declared {dtype}", field=name)
        raw = memoryview(wire_array(part).reshape(-1)).cast("B")
        if offset + len(raw) > tensor.nbytes:
            raise TensorFormatError(f"parts of more than the {tensor.nbytes} bytes declared", field=name)
        if len(raw):
            yield offset, raw
        offset += len(raw)
    if offset != tensor.nbytes:
        raise TensorFormatError(f"parts of {offset} bytes, {tensor.nbytes} declared", field=name)


class Placement(NamedTuple):
    """Where `TensorAssembler`'s `allocate` places a tensor that is filled through
    `write(offset, bytes)` (a file's pages, written without being mapped first) rather than by
    copying into `array`, which views the same bytes."""

    array: np.ndarray
    write: Callable[[int, object], None]


class TensorAssembler:
    """Rebuilds the named arrays of one header from its inline tensors and the chunks that follow.

    Everything is checked from the header alone (names, dtypes, shapes, total size) before any
    buffer is allocated; chunks must fill each buffer in order, without gaps or overlap.
    """

    def __init__(self, entries: Iterable[tensor_pb2.NamedTensor], max_total_bytes: int,
                 allocate: Callable[[dict], Mapping[str, np.ndarray]] | None = None):
        """`allocate`, given `{name: (dtype, shape)}` of every tensor once the header is checked,
        returns writable buffers (or `Placement`s) for the ones it places (the receiver's own
        memory); the rest get buffers of their own, and inline tensors are copied into a placed
        buffer."""
        self.arrays: dict[str, np.ndarray] = {}
        self._buffers: list[np.ndarray | None] = []  # flat uint8 views of chunked tensors
        self._received: list[int] = []
        self._missing = 0  # chunked tensors not yet complete
        self._writers: list = []  # each tensor's Placement.write, or None
        checked = []  # (name, dtype, shape, nbytes, inline array or None)
        total = 0
        for entry in entries:
            name = entry.name
            if not name:
                raise TensorFormatError("every tensor needs a name", field=f"tensors[{len(checked)}]")
            if any(name == seen[0] for seen in checked):
                raise TensorFormatError("tensor sent twice", field=name)
            dtype, shape, nbytes = tensor_nbytes(entry.tensor, name, max_total_bytes - total)
            total += nbytes
            if entry.chunked:
                if entry.tensor.data:
                    raise TensorFormatError("a chunked tensor carries no inline data", field=name)
                inline = None
            else:
                inline = decode_tensor(entry.tensor, name, max_total_bytes)
            checked.append((name, dtype, shape, nbytes, inline))
        placed = allocate({name: (dtype, shape) for name, dtype, shape, _, _ in checked}) if allocate else {}
        for name, dtype, shape, nbytes, inline in checked:
            array, write = placed.get(name), None
            if isinstance(array, Placement):
                array, write = array
            if inline is None:
                array = np.empty(shape, dtype=dtype) if array is None else array
                self._buffers.append(array.reshape(-1).view(np.uint8))
                self._missing += nbytes > 0
            else:
                if write is not None:
                    write(0, np.ascontiguousarray(inline).reshape(-1).view(np.uint8))
                elif array is not None:
                    np.copyto(array, inline)
                self._buffers.append(None)
            self._writers.append(write)
            self._received.append(0)
            self.arrays[name] = inline if array is None else array
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
        write = self._writers[index]
        if write is None:
            buffer[start:end] = np.frombuffer(data, dtype=np.uint8)
        else:
            write(start, data)
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
    messages: Iterator, max_total_bytes: int, *, single: bool,
    allocate: Callable[[dict], Mapping[str, np.ndarray]] | None = None,
) -> Iterator[tuple[object, dict[str, np.ndarray]]]:
    """(header, arrays) for each header of a `oneof part {header, chunk}` stream, once complete.

    `single`: the stream holds exactly one header (anything after its last chunk is an error).
    `allocate`: where the arrays are assembled (`TensorAssembler`).
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
            assembler = TensorAssembler(header.tensors, max_total_bytes, allocate)
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
