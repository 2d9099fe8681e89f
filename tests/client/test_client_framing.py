"""Hand-framed chunk messages are byte-identical to protobuf's, both ways, for every part message."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from gradserve.rpc.frames import Chunk, PartCodec, decode_chunk_frame, encode_chunk_frame
from gradserve.rpc.methods import rpc_codecs
from gradserve.transfer import CHUNK_BYTES, OutgoingTensors, read_messages
from gradserve.v1 import service_pb2, tensor_pb2

SERVICE = service_pb2.DESCRIPTOR.services_by_name["Gradserve"]
PART_MESSAGES = [
    service_pb2.ComputeGradientsRequest,
    service_pb2.ComputeGradientsResponse,
    service_pb2.CreateSessionRequest,
    service_pb2.StepRequest,
    service_pb2.PullParametersResponse,
]
# Sizes around every varint length boundary, and the SDK's chunk size.
DATA_SIZES = [0, 1, 127, 128, 16383, 16384, CHUNK_BYTES - 1, CHUNK_BYTES]


def _protobuf(wrap, index: int, offset: int, data: bytes):
    return wrap(chunk=tensor_pb2.TensorChunk(index=index, offset=offset, data=data))


@pytest.mark.parametrize("wrap", PART_MESSAGES, ids=lambda m: m.DESCRIPTOR.name)
@pytest.mark.parametrize("size", DATA_SIZES)
@pytest.mark.parametrize("index, offset", [(0, 0), (1, 0), (0, 1), (127, 128), ((1 << 32) - 1, (1 << 64) - 1)])
def test_hand_frame_equals_protobuf_encoding_and_back(wrap, size, index, offset):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    codec = PartCodec(wrap)
    frame = codec.serialize(Chunk(index, offset, memoryview(data)))
    expected = _protobuf(wrap, index, offset, data)
    assert frame == expected.SerializeToString()
    assert Chunk(index, offset, data).ByteSize() == expected.ByteSize()
    assert wrap.FromString(frame) == expected  # the generated class reads the hand-written frame
    decoded = codec.deserialize(expected.SerializeToString())  # and the hand reader protobuf's
    assert type(decoded) is Chunk
    assert (decoded.index, decoded.offset, bytes(decoded.data)) == (index, offset, data)


@given(index=st.integers(0, (1 << 32) - 1), offset=st.integers(0, (1 << 64) - 1), data=st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_chunk_round_trips_bit_exactly(index, offset, data):
    expected = _protobuf(service_pb2.StepRequest, index, offset, data).SerializeToString()
    assert encode_chunk_frame(Chunk(index, offset, data)) == expected
    decoded = decode_chunk_frame(expected)
    assert (decoded.index, decoded.offset, bytes(decoded.data)) == (index, offset, data)


def test_decoded_data_is_a_view_of_the_received_bytes():
    raw = _protobuf(service_pb2.PullParametersResponse, 3, 1 << 20, b"\x07" * 1000).SerializeToString()
    decoded = decode_chunk_frame(raw)
    assert isinstance(decoded.data, memoryview) and decoded.data.obj is raw


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return bytes([number << 3 | wire_type]) + payload


def _len(number: int, payload: bytes) -> bytes:
    return _field(number, 2, bytes([len(payload)]) + payload)


@pytest.mark.parametrize(
    "raw",
    [
        # fields in reverse order: valid protobuf, not what protobuf writes
        _len(2, _len(3, b"abc") + _field(2, 0, b"\x05") + _field(1, 0, b"\x02")),
        # an unknown field inside the chunk
        _len(2, _field(1, 0, b"\x02") + _field(9, 0, b"\x01") + _len(3, b"abc")),
        # two chunk fields: protobuf merges them
        _len(2, _field(1, 0, b"\x02")) + _len(2, _field(2, 0, b"\x05") + _len(3, b"abc")),
        # a repeated scalar: the last one wins
        _len(2, _field(1, 0, b"\x02") + _field(1, 0, b"\x04") + _len(3, b"abc")),
        # a non-minimal varint key
        _len(2, bytes([0x88, 0x00]) + b"\x02" + _len(3, b"abc")),
        # a chunk followed by a header: the oneof keeps the last
        _len(2, _field(1, 0, b"\x02")) + _len(1, b""),
        # an index beyond uint32: protobuf truncates it
        _len(2, _field(1, 0, b"\x80\x80\x80\x80\x10") + _len(3, b"abc")),
    ],
)
def test_any_valid_encoding_reads_as_protobuf_reads_it(raw):
    expected = service_pb2.StepRequest.FromString(raw)
    message = PartCodec(service_pb2.StepRequest).deserialize(raw)
    if type(message) is Chunk:
        assert expected.WhichOneof("part") == "chunk"
        assert (message.index, message.offset, bytes(message.data)) == \
            (expected.chunk.index, expected.chunk.offset, expected.chunk.data)
    else:
        assert message == expected


@pytest.mark.parametrize("raw", [b"\x12\x05\x1a\x09abc", b"\x12\x02\x08", b"\x12\x03\x08\xff\xff"])
def test_malformed_frames_fail_as_protobuf_fails(raw):
    assert decode_chunk_frame(raw) is None
    with pytest.raises(DecodeError):
        PartCodec(service_pb2.StepRequest).deserialize(raw)


def test_headers_go_through_protobuf():
    header = service_pb2.StepRequest(header=service_pb2.StepHeader(session_id="s", step_id=7))
    codec = PartCodec(service_pb2.StepRequest)
    assert codec.serialize(header) == header.SerializeToString()
    assert codec.deserialize(header.SerializeToString()) == header


def test_every_method_has_codecs_and_only_part_messages_are_hand_framed():
    codecs = rpc_codecs(SERVICE)
    assert set(codecs) == {method.name for method in SERVICE.methods}
    framed = {
        (name, side)
        for name, rpc in codecs.items()
        for side, serializer in (("request", rpc.request_serializer), ("response", rpc.response_serializer))
        if getattr(serializer, "__self__", None).__class__ is PartCodec
    }
    assert framed == {("ComputeGradients", "request"), ("ComputeGradients", "response"),
                      ("Forward", "request"), ("Forward", "response"),
                      ("CreateSession", "request"), ("Step", "request"), ("StreamSteps", "request"),
                      ("PullParameters", "response"), ("PullRows", "request"), ("PullRows", "response"),
                      ("StepForward", "request"), ("StepForward", "response"), ("StepBackward", "request"),
                      ("StepBackward", "response")}
    assert codecs["ListSessions"].response_deserializer == service_pb2.ListSessionsResponse.FromString


def test_sdk_chunks_framed_by_hand_equal_protobuf_chunks_and_reassemble():
    arrays = {"big": np.arange(3 * CHUNK_BYTES // 4 + 5, dtype=np.float32), "small": np.ones(3)}
    outgoing = OutgoingTensors(arrays)
    codec = PartCodec(service_pb2.StepRequest)
    frames = [codec.serialize(chunk) for chunk in outgoing.chunks()]
    assert frames == [m.SerializeToString() for m in outgoing.chunks(service_pb2.StepRequest)]
    header = service_pb2.StepRequest(header=service_pb2.StepHeader(tensors=outgoing.entries))
    received = [codec.deserialize(raw) for raw in [header.SerializeToString(), *frames]]
    ((_, assembled),) = list(read_messages(iter(received), 1 << 30, single=True))
    for name, value in arrays.items():
        np.testing.assert_array_equal(assembled[name], value)
