"""DescribeModel and GetServerInfo over a real gRPC server: the engine's description, the lists
the service validates with (never restated), limits; bad specs and dtypes named."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from .conftest import SPEC, initial_parameters
from gradserve import InvalidArgument, mlp
from gradserve.rpc.status import from_rpc_error
from gradserve.spec import spec_to_proto
from gradserve.v1 import describe_pb2
from gradserve_services.cluster.config import COMPRESSIONS, CONSISTENCY_MODES
from gradserve_services.engine import LOSSES, OPS, Model
from gradserve_services.engine.describe import describe_model
from gradserve_services.gateway.sessions import SessionLimits
from gradserve_services.optim import OPTIMIZER_NAMES, OptimizerConfig
from gradserve_services.optim.rows import TABLE_OPTIMIZER_NAMES


def test_describe_model_is_the_engines_description(client):
    described = client.describe_model(SPEC, dtype="float64")
    expected = describe_model(SPEC, "float64")
    assert [(p["name"], tuple(p["shape"])) for p in described["parameters"]] == \
        [(p["name"], p["shape"]) for p in expected["parameters"]]
    assert described["parameter_count"] == expected["parameter_count"]
    assert described["forward_flops_per_row"] == expected["forward_flops_per_row"]
    assert described["activation_bytes_per_row"] == expected["activation_bytes_per_row"]
    assert described["inputs"] == [{"name": "input", "kind": "float", "width": 6, "tensors": ["batch.x"]}]
    weight = described["parameters"][0]
    assert weight["layout"].startswith("(in, units)") and weight["dtype"] == "float64"


def test_the_described_names_and_shapes_are_what_the_service_takes(client):
    """A client that knows only the description builds parameters the service accepts."""
    described = client.describe_model(SPEC)
    rng = np.random.default_rng(0)
    params = {p["name"]: rng.standard_normal(p["shape"]).astype(p["dtype"]) for p in described["parameters"]}
    x = rng.standard_normal((5, described["inputs"][0]["width"])).astype(np.float32)
    out = client.forward(SPEC, params, x)
    assert out.shape == (5, described["output_width"])
    np.testing.assert_allclose(out, Model(SPEC).forward(params, x), rtol=1e-6)
    assert set(params) == set(initial_parameters())


def test_server_info_lists_what_the_service_validates_with(client):
    info = client.server_info()
    assert [op["name"] for op in info["ops"]] == list(OPS)
    assert [loss["name"] for loss in info["losses"]] == list(LOSSES)
    assert info["optimizers"] == list(OPTIMIZER_NAMES)
    assert info["consistency_modes"] == list(CONSISTENCY_MODES)
    assert info["compression_methods"] == list(COMPRESSIONS)
    assert info["table_optimizers"] == list(TABLE_OPTIMIZER_NAMES)
    assert info["dtypes"] == ["float32", "float64"]
    limits = SessionLimits()
    assert info["limits"]["sessions_per_owner"] == limits.sessions_per_owner
    assert info["limits"]["call_timeout_s"] == limits.call_timeout_s  # what a session's steps may wait
    assert info["limits"]["max_message_bytes"] == 8 << 20
    lr = next(s for s in info["optimizer_settings"] if s["name"] == "lr")
    assert lr["low"] == 0.0 and not lr["low_inclusive"] and lr["default_json"] == str(OptimizerConfig().lr)
    dropout = next(op for op in info["ops"] if op["name"] == "dropout")
    rate = dropout["attributes"][0]
    assert rate["required"] and rate["high"] == 1.0 and not rate["high_inclusive"]
    dense = next(op for op in info["ops"] if op["name"] == "dense")
    assert set(dense["parameters"]) == {"weight", "bias"}


def test_server_info_ranges_are_the_ones_enforced(client):
    """The advertised upper bound of dropout's rate and lower bound of lr are refused at the bound."""
    info = client.server_info()
    rate = next(op for op in info["ops"] if op["name"] == "dropout")["attributes"][0]
    spec = mlp(6, [4], 3)
    spec["nodes"].insert(1, {"name": "drop", "op": "dropout", "inputs": ["fc1"], "rate": rate["high"]})
    spec["nodes"][2]["inputs"] = ["drop"]
    with pytest.raises(InvalidArgument) as refused:
        client.describe_model(spec)
    assert refused.value.field == "drop"
    with pytest.raises(InvalidArgument) as refused:
        client.create_session(SPEC, optimizer={"name": "sgd", "lr": 0.0})
    assert refused.value.field == "optimizer.lr"


def test_bad_describe_requests_are_named(client, stub):
    bad = mlp(6, [16], 3)
    del bad["nodes"][0]["units"]
    with pytest.raises(InvalidArgument) as refused:
        client.describe_model(bad)
    assert refused.value.field == bad["nodes"][0]["name"]
    with pytest.raises(grpc.RpcError) as refused:
        stub.DescribeModel(describe_pb2.DescribeModelRequest(model=spec_to_proto(SPEC), dtype="int8"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(refused.value).field == "dtype"
