"""Forward and vector-Jacobian products over a real gRPC server: equal to the engine's, chunked
beyond 1 MiB, session form at the session's parameters, bad input named and nothing changed."""

import grpc
import numpy as np
import pytest

from .conftest import SPEC, batch, initial_parameters
from gradserve import InvalidArgument, NotFound, mlp
from gradserve_services.engine import Model
from gradserve_services.engine.vjp import vjp
from gradserve.v1 import service_pb2
from gradserve.codec import encode_tensor


def output_gradient(rows=12, width=3, dtype=np.float32, seed=5):
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(dtype)


def test_vjp_equals_the_engine(client):
    params = initial_parameters()
    x, _ = batch()
    grad = output_gradient()
    answer = client.vjp(SPEC, params, x, grad, input_gradient=True)
    expected = vjp(Model(SPEC), params, x, grad, input_gradient=True)
    assert answer.count == 12 and list(answer.gradients) == list(expected.gradients)
    for name, value in answer.gradients.items():
        np.testing.assert_array_equal(value, expected.gradients[name])
    np.testing.assert_array_equal(answer.input_gradient, expected.input_gradients["x"])
    assert client.vjp(SPEC, params, x, grad).input_gradient is None


def test_vjp_of_the_mean_loss_gradient_equals_compute_gradients(client):
    spec = mlp(6, [16], 3, loss="mse")
    params = initial_parameters(spec, dtype="float64")
    x = np.random.default_rng(0).standard_normal((10, 6))
    y = np.random.default_rng(1).standard_normal((10, 3))
    out = client.forward(spec, params, x)
    answer = client.vjp(spec, params, x, 2 * (out - y) / out.size)
    reference = client.compute_gradients(spec, params, x, y)
    for name, value in reference.gradients.items():
        np.testing.assert_allclose(answer.gradients[name], value, rtol=1e-10, atol=1e-14)


def test_forward_stateless_named_nodes_and_chunked(client):
    params = initial_parameters()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30_000, 6)).astype(np.float32)  # outputs of 1.9 MiB: chunked both ways
    out = client.forward(SPEC, params, x)
    np.testing.assert_array_equal(out, Model(SPEC).forward(params, x))
    names = [node["name"] for node in SPEC["nodes"]]
    values = client.forward(SPEC, params, x[:4], nodes=names[:1])
    assert list(values) == names[:1]
    np.testing.assert_allclose(values[names[0]], x[:4] @ params[f"{names[0]}.weight"] + params[f"{names[0]}.bias"],
                               rtol=1e-5, atol=1e-6)


def test_forward_on_a_session_uses_its_current_parameters(client, session):
    x, y = batch()
    client.step(session, x, y)
    version, out = client.forward_session(session, x)
    pulled_version, params = client.pull_parameters(session)
    assert version == pulled_version == 1
    np.testing.assert_array_equal(out, Model(SPEC).forward(params, x))
    with pytest.raises(NotFound):
        client.forward_session("no-such-session", x)


BAD_GRADIENTS = {
    "wrong shape": (lambda g: g[:, :2], "shape"),
    "wrong dtype": (lambda g: g.astype(np.float64), "dtype"),
    "nan": (lambda g: np.where(np.arange(g.size).reshape(g.shape) == 4, np.nan, g).astype(g.dtype), "NaN"),
    "inf": (lambda g: np.where(np.arange(g.size).reshape(g.shape) == 1, np.inf, g).astype(g.dtype), "NaN"),
}


@pytest.mark.parametrize("case", list(BAD_GRADIENTS))
def test_bad_output_gradient_is_invalid_argument_naming_it(client, case):
    make_bad, needle = BAD_GRADIENTS[case]
    x, _ = batch()
    with pytest.raises(InvalidArgument) as raised:
        client.vjp(SPEC, initial_parameters(), x, make_bad(output_gradient()))
    assert raised.value.field == "output_gradient" and needle in str(raised.value)


def raw_compute(stub, tensors, **header_fields):
    header = service_pb2.ComputeGradientsHeader(model=client_spec(), **header_fields)
    for name, value in tensors.items():
        header.tensors.add(name=name, tensor=encode_tensor(value))
    responses = stub.ComputeGradients(iter([service_pb2.ComputeGradientsRequest(header=header)]), timeout=60)
    return list(responses)


def client_spec():
    from gradserve import spec_to_proto
    return spec_to_proto(SPEC)


def field_of(error: grpc.RpcError) -> str:
    from gradserve.rpc.status import from_rpc_error
    return from_rpc_error(error).field


def test_labels_and_output_gradient_both_or_neither(stub):
    params = {f"parameters.{k}": v for k, v in initial_parameters().items()}
    x, y = batch()
    with pytest.raises(grpc.RpcError) as both:
        raw_compute(stub, {**params, "batch.x": x, "batch.y": y, "output_gradient": output_gradient()})
    assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(both.value) == "output_gradient"
    with pytest.raises(grpc.RpcError) as neither:
        raw_compute(stub, {**params, "batch.x": x})
    assert neither.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(neither.value) == "batch.y"
    assert "output_gradient" in neither.value.details()
    with pytest.raises(grpc.RpcError) as asked:
        raw_compute(stub, {**params, "batch.x": x, "batch.y": y}, input_gradient=True)
    assert asked.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(asked.value) == "input_gradient"


def test_unknown_node_to_forward_is_named_and_the_server_stays_up(client, session):
    x, y = batch()
    with pytest.raises(InvalidArgument) as raised:
        client.forward(SPEC, initial_parameters(), x, nodes=[SPEC["output"], "nope"])
    assert raised.value.field == "nodes[1]"
    version_before, params_before = client.pull_parameters(session)
    with pytest.raises(InvalidArgument) as raised:
        client.forward_session(session, x, nodes=["nope"])
    assert raised.value.field == "nodes[0]"
    version_after, params_after = client.pull_parameters(session)
    assert version_after == version_before
    for name, value in params_before.items():
        np.testing.assert_array_equal(params_after[name], value)
    assert client.step(session, x, y).applied


NAMED_SPEC = {
    "inputs": [{"name": "dense", "kind": "float", "features": 3}, {"name": "cats", "kind": "ids", "fields": 2}],
    "nodes": [
        {"name": "emb", "op": "embedding", "inputs": ["cats"], "rows": 5, "dim": 2},
        {"name": "joined", "op": "concat", "inputs": ["dense", "emb"]},
        {"name": "fc", "op": "dense", "inputs": ["joined"], "units": 2},
    ],
    "output": "fc",
    "loss": "mse",
}


def test_named_inputs_forward_and_vjp_with_input_gradients_equal_torch(client):
    """A model with named inputs: Forward and the vector-Jacobian product take the batch as a
    mapping; dL/d(float input) comes back under its tensor name (ids have none); torch agrees."""
    import torch

    params = Model(NAMED_SPEC).init_parameters(seed=2, dtype="float64")
    rng = np.random.default_rng(4)
    x = {"dense": rng.standard_normal((6, 3)), "cats": rng.integers(0, 5, (6, 2))}
    grad = rng.standard_normal((6, 2))
    weights = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    dense = torch.tensor(x["dense"], requires_grad=True)
    embedded = weights["emb.weight"][torch.from_numpy(x["cats"])].reshape(6, 4)
    out = torch.cat([dense, embedded], dim=1) @ weights["fc.weight"] + weights["fc.bias"]
    (out * torch.from_numpy(grad)).sum().backward()

    np.testing.assert_allclose(client.forward(NAMED_SPEC, params, x), out.detach().numpy(), rtol=1e-12)
    answer = client.vjp(NAMED_SPEC, params, x, grad, input_gradient=True)
    assert list(answer.input_gradient) == ["dense"] and answer.count == 6
    np.testing.assert_allclose(answer.input_gradient["dense"], dense.grad.numpy(), rtol=1e-10)
    dense_grads = {name: g.dense(5) if hasattr(g, "dense") else g for name, g in answer.gradients.items()}
    for name, w in weights.items():
        np.testing.assert_allclose(dense_grads[name], w.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_vjp_on_a_session_is_at_its_current_parameters_and_applies_nothing(client, session):
    x, y = batch()
    client.step(session, x, y)
    grad = output_gradient()
    answer = client.vjp_session(session, x, grad, input_gradient=True)
    version, params = client.pull_parameters(session)
    assert answer.version == version == 1
    expected = vjp(Model(SPEC), params, x, grad, input_gradient=True)
    for name, value in answer.gradients.items():
        np.testing.assert_array_equal(value, expected.gradients[name])
    np.testing.assert_array_equal(answer.input_gradient, expected.input_gradients["x"])
    assert client.pull_parameters(session)[0] == 1  # nothing applied
    with pytest.raises(NotFound):
        client.vjp_session("no-such-session", x, grad)


def test_a_session_form_refuses_parameters_sent(stub, session):
    x, _ = batch()
    header = service_pb2.ComputeGradientsHeader(session_id=session)
    for name, value in {"parameters.fc1.bias": np.zeros(16, np.float32), "batch.x": x,
                        "output_gradient": output_gradient()}.items():
        header.tensors.add(name=name, tensor=encode_tensor(value))
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.ComputeGradients(iter([service_pb2.ComputeGradientsRequest(header=header)]), timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(refused.value) == "parameters.fc1.bias"
