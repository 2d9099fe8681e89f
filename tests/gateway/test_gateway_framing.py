"""Hand-framed chunks on a real server: plain protobuf clients interoperate, and a 100M-parameter
model moves both ways bit-exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gradserve.spec import spec_to_proto
from gradserve.transfer import CHUNK_BYTES, OutgoingTensors, read_messages
from gradserve.v1 import service_pb2

from .conftest import batch

WIDE = 1500  # 1500 x 1500 float32: 9 MB, so chunked, and not a whole number of chunks
WIDE_SPEC = {"input_features": WIDE, "output": "dense", "loss": "mse",
             "nodes": [{"name": "dense", "op": "dense", "inputs": ["input"], "units": WIDE, "bias": False}]}


def test_plain_protobuf_client_pushes_and_pulls_chunked_parameters(stub, client):
    """The generated stub serializes every chunk with protobuf and parses every reply with it."""
    weight = np.random.default_rng(3).standard_normal((WIDE, WIDE), dtype=np.float32)
    assert weight.nbytes % CHUNK_BYTES
    outgoing = OutgoingTensors({"parameters.dense.weight": weight})
    wrap = service_pb2.CreateSessionRequest
    header = service_pb2.CreateSessionHeader(tensors=outgoing.entries)
    header.config.model.CopyFrom(spec_to_proto(WIDE_SPEC))
    header.config.num_workers = 1
    created = stub.CreateSession(itertools.chain([wrap(header=header)], outgoing.chunks(wrap)), timeout=60)
    try:
        replies = list(stub.PullParameters(service_pb2.PullParametersRequest(session_id=created.session_id),
                                           timeout=60))
        assert all(type(reply) is service_pb2.PullParametersResponse for reply in replies)
        assert sum(reply.WhichOneof("part") == "chunk" for reply in replies) == -(-weight.nbytes // CHUNK_BYTES)
        ((_, pulled),) = list(read_messages(iter(replies), 1 << 30, single=True))
        np.testing.assert_array_equal(pulled["parameters.dense.weight"], weight)
        _, sdk_pulled = client.pull_parameters(created.session_id)
        np.testing.assert_array_equal(sdk_pulled["dense.weight"], weight)
    finally:
        client.close_session(created.session_id)


def test_plain_protobuf_client_reads_hand_framed_gradients(stub, client, executor):
    weight = np.random.default_rng(4).standard_normal((WIDE, WIDE), dtype=np.float32) * 0.01
    x, _ = batch(rows=3, spec=WIDE_SPEC)
    y = np.zeros((3, WIDE), np.float32)
    outgoing = OutgoingTensors({"parameters.dense.weight": weight, "batch.x": x, "batch.y": y})
    wrap = service_pb2.ComputeGradientsRequest
    header = service_pb2.ComputeGradientsHeader(model=spec_to_proto(WIDE_SPEC), tensors=outgoing.entries)
    replies = list(stub.ComputeGradients(itertools.chain([wrap(header=header)], outgoing.chunks(wrap)), timeout=60))
    ((result, arrays),) = list(read_messages(iter(replies), 1 << 30, single=True))
    local = executor.compute_gradients(WIDE_SPEC, {"dense.weight": weight}, x, y)
    assert result.loss == local["loss"]
    np.testing.assert_array_equal(arrays["gradients.dense.weight"], local["grads"]["dense.weight"])


@pytest.mark.slow
def test_100m_parameter_model_round_trip(client):
    """400 MB in 382 chunks each way; the last chunk is partial."""
    features = 10_000
    spec = {**WIDE_SPEC, "input_features": features,
            "nodes": [{**WIDE_SPEC["nodes"][0], "units": features}]}
    weight = np.random.default_rng(5).standard_normal((features, features), dtype=np.float32)
    session = client.create_session(spec, {"dense.weight": weight}, num_workers=1)
    try:
        version, pulled = client.pull_parameters(session)
        assert version == 0
        assert pulled["dense.weight"].dtype == np.float32
        assert np.array_equal(pulled["dense.weight"], weight)
    finally:
        client.close_session(session)
