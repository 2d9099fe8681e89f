"""The tensor codec, the chunk assembler and the spec converters, without a server."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradserve import GraphBuilder, mlp
from gradserve.codec import TensorFormatError, TensorTooLarge, decode_tensor, encode_tensor
from gradserve.spec import SpecFormatError, optimizer_from_proto, optimizer_to_proto, spec_from_proto, spec_to_proto
from gradserve.transfer import CHUNK_BYTES, OutgoingTensors, TensorAssembler, read_messages
from gradserve.v1 import service_pb2, tensor_pb2


@given(hnp.arrays(st.sampled_from(["float32", "float64", "int64", "int32", ">f4", ">i8"]),
                  hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
@settings(max_examples=200, deadline=None)
def test_round_trip_any_array(array):
    decoded = decode_tensor(encode_tensor(array), "t")
    assert decoded.shape == array.shape and decoded.dtype == array.dtype.newbyteorder("<")
    np.testing.assert_array_equal(decoded, array)


def test_decode_does_not_copy():
    message = encode_tensor(np.arange(6, dtype=np.float32))
    decoded = decode_tensor(message, "t")
    assert not decoded.flags.owndata and not decoded.flags.writeable


@pytest.mark.parametrize(
    "dtype, shape, data, error",
    [
        ("float16", [2], b"\0" * 4, TensorFormatError),
        ("float32", [2, 3], b"\0" * 23, TensorFormatError),
        ("float32", [-1, 2], b"", TensorFormatError),
        ("float32", [1] * 9, b"\0" * 4, TensorFormatError),
        ("float32", [1 << 62, 1 << 62, 1 << 62], b"", TensorTooLarge),  # no overflow: Python ints
        ("float32", [0, 1 << 31, 1 << 31], b"", TensorFormatError),  # empty, yet too big for numpy
    ],
)
def test_decode_rejects(dtype, shape, data, error):
    with pytest.raises(error) as caught:
        decode_tensor(tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data), "batch.x")
    assert caught.value.field == "batch.x"


def test_empty_tensors_with_large_other_dimensions_decode():
    decoded = decode_tensor(tensor_pb2.Tensor(dtype="float32", shape=[0, 1 << 20, 3], data=b""), "batch.x")
    assert decoded.shape == (0, 1 << 20, 3)


def test_encode_rejects_unsupported_dtype():
    with pytest.raises(TensorFormatError):
        encode_tensor(np.zeros(2, np.complex64))


def test_chunked_round_trip_interleaved_and_inline():
    arrays = {
        "small": np.arange(5, dtype=np.int64),
        "big": np.random.default_rng(0).standard_normal((3 * CHUNK_BYTES // 8 + 7,)),
        "also_big": np.ones((600, 600), np.float32),
    }
    outgoing = OutgoingTensors(arrays)
    assert [e.chunked for e in outgoing.entries] == [False, True, True]
    messages = [service_pb2.StepRequest(header=service_pb2.StepHeader(tensors=outgoing.entries))]
    chunks = list(outgoing.chunks(service_pb2.StepRequest))
    assert max(m.ByteSize() for m in chunks) < CHUNK_BYTES + 64  # per-chunk overhead is tiny
    # interleave the two tensors' chunks: allowed, each stays in order
    big = [c for c in chunks if c.chunk.index == 1]
    other = [c for c in chunks if c.chunk.index == 2]
    interleaved = [m for pair in zip(big, other) for m in pair] + big[len(other):] + other[len(big):]
    ((header, received),) = list(read_messages(iter(messages + interleaved), 1 << 30, single=True))
    for name, value in arrays.items():
        np.testing.assert_array_equal(received[name], value)


def test_assembler_checks_total_size_before_allocating():
    entry = tensor_pb2.NamedTensor(name="parameters.w", chunked=True,
                                   tensor=tensor_pb2.Tensor(dtype="float64", shape=[1 << 20, 1 << 20]))
    with pytest.raises(TensorTooLarge):
        TensorAssembler([entry], 1 << 30)


def test_spec_round_trip_keeps_unset_defaults_unset():
    graph = GraphBuilder(3, loss="mse")
    hidden = graph.leaky_relu(graph.layernorm(graph.dense("input", 4, bias=False), eps=1e-3), 0.2)
    spec = graph.build(graph.dense(graph.concat(hidden, hidden, graph.dropout(hidden, 0.1)), 2))
    assert spec_from_proto(spec_to_proto(spec)) == spec
    assert spec_from_proto(spec_to_proto(mlp(784, [128], 10))) == mlp(784, [128], 10)


@pytest.mark.parametrize(
    "spec, field",
    [
        ({**mlp(2, [], 2), "extra": 1}, "extra"),
        ({**mlp(2, [], 2), "nodes": [{"name": "n", "op": "dense", "inputs": ["input"], "size": 3}]}, "n.size"),
        ({**mlp(2, [], 2), "nodes": [{"name": "n", "op": "dense", "inputs": ["input"], "units": "3"}]}, "n"),
        ({**mlp(2, [], 2), "input_features": 2.5}, "input_features"),
    ],
)
def test_spec_to_proto_names_what_it_cannot_express(spec, field):
    with pytest.raises(SpecFormatError) as caught:
        spec_to_proto(spec)
    assert caught.value.field == field


def test_optimizer_round_trip():
    config = {"name": "adamw", "lr": 0.001, "weight_decay": 0.01, "clip_norm": 1.0,
              "schedule": {"name": "cosine", "total_steps": 100, "warmup_steps": 5}}
    assert optimizer_from_proto(optimizer_to_proto(config)) == config
    assert optimizer_from_proto(optimizer_to_proto(None)) == {}
