"""A client written from the .proto files alone (the generated stub and messages, no SDK helpers,
plain protobuf framing): it learns what the service takes from GetServerInfo and DescribeModel,
builds the parameters from the description, trains a session by two-phase steps with its own
loss, and reads the parameters back; the service's answers match an in-process reference."""

from __future__ import annotations

import numpy as np

from gradserve.v1 import describe_pb2, model_pb2, service_pb2, tensor_pb2

LAYER_UNITS = (5, 3)


def tensor(name: str, array: np.ndarray) -> tensor_pb2.NamedTensor:
    """dtype + shape + raw little-endian C-order bytes, as tensor.proto says."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return tensor_pb2.NamedTensor(name=name, tensor=tensor_pb2.Tensor(
        dtype=array.dtype.name, shape=list(array.shape), data=array.tobytes()))


def array_of(named: tensor_pb2.NamedTensor) -> np.ndarray:
    return np.frombuffer(named.tensor.data, dtype=named.tensor.dtype).reshape(tuple(named.tensor.shape))


def model_message(info) -> model_pb2.ModelSpec:
    """dense -> tanh -> dense, with the attributes the service says dense requires."""
    ops = {op.name: op for op in info.ops}
    assert {"dense", "tanh"} <= set(ops) and "softmax_cross_entropy" in {loss.name for loss in info.losses}
    assert [a.name for a in ops["dense"].attributes if a.required] == ["units"]
    assert set(ops["dense"].parameters) == {"weight", "bias"} and not ops["tanh"].parameters
    return model_pb2.ModelSpec(input_features=4, output="out", loss="softmax_cross_entropy", nodes=[
        model_pb2.Node(name="hidden", op="dense", inputs=["input"], units=LAYER_UNITS[0]),
        model_pb2.Node(name="act", op="tanh", inputs=["hidden"]),
        model_pb2.Node(name="out", op="dense", inputs=["act"], units=LAYER_UNITS[1]),
    ])


def test_a_client_from_the_protos_alone_trains_with_its_own_loss(stub):
    info = stub.GetServerInfo(describe_pb2.GetServerInfoRequest(), timeout=30)
    assert info.version and "sgd" in info.optimizers and "sync" in info.consistency_modes
    assert info.limits["max_message_bytes"] >= 1 << 20
    model = model_message(info)
    described = stub.DescribeModel(describe_pb2.DescribeModelRequest(model=model, dtype="float64"), timeout=30)
    rng = np.random.default_rng(0)
    params = {p.name: rng.standard_normal(tuple(p.shape)) * 0.5 for p in described.parameters}
    assert [(p.name, tuple(p.shape)) for p in described.parameters] == [
        ("hidden.weight", (4, 5)), ("hidden.bias", (5,)), ("out.weight", (5, 3)), ("out.bias", (3,))]

    config = service_pb2.SessionConfig(model=model, optimizer=model_pb2.OptimizerConfig(name="sgd", lr=0.5))
    header = service_pb2.CreateSessionHeader(config=config, tensors=[tensor(f"parameters.{k}", v)
                                                                     for k, v in params.items()])
    session = stub.CreateSession(iter([service_pb2.CreateSessionRequest(header=header)]), timeout=30).session_id

    x = rng.standard_normal((8, described.inputs[0].width))
    labels = np.arange(8) % described.output_width
    forward_header = service_pb2.StepForwardHeader(session_id=session, step_id=1, tensors=[tensor("batch.x", x)])
    (answer,) = stub.StepForward(iter([service_pb2.StepForwardRequest(header=forward_header)]), timeout=30)
    (logits_tensor,) = answer.header.tensors
    assert logits_tensor.name == f"outputs.{described.output}"
    logits = array_of(logits_tensor)
    expected_logits = np.tanh(x @ params["hidden.weight"] + params["hidden.bias"]) @ params["out.weight"] \
        + params["out.bias"]  # the layouts DescribeModel states: out = x @ weight + bias
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-12)

    # the client's own loss: a mean squared distance to one-hot targets, dL/dz with its 1/rows
    targets = np.eye(described.output_width)[labels]
    loss = float(((logits - targets) ** 2).sum(axis=1).mean())
    output_gradient = 2 * (logits - targets) / len(x)
    backward_header = service_pb2.StepBackwardHeader(session_id=session, step_id=1, loss=loss,
                                                     tensors=[tensor("output_gradient", output_gradient)])
    (reply,) = stub.StepBackward(iter([service_pb2.StepBackwardRequest(header=backward_header)]), timeout=30)
    assert reply.header.step.applied and reply.header.step.version == 1 and reply.header.step.loss == loss

    parts = list(stub.PullParameters(service_pb2.PullParametersRequest(session_id=session), timeout=30))
    pulled = {t.name.removeprefix("parameters."): array_of(t) for t in parts[0].header.tensors}
    hidden = np.tanh(x @ params["hidden.weight"] + params["hidden.bias"])
    d_hidden = (output_gradient @ params["out.weight"].T) * (1 - hidden ** 2)
    expected = {"out.weight": params["out.weight"] - 0.5 * hidden.T @ output_gradient,
                "out.bias": params["out.bias"] - 0.5 * output_gradient.sum(axis=0),
                "hidden.weight": params["hidden.weight"] - 0.5 * x.T @ d_hidden,
                "hidden.bias": params["hidden.bias"] - 0.5 * d_hidden.sum(axis=0)}
    for name, value in expected.items():
        np.testing.assert_allclose(pulled[name], value, rtol=1e-12, atol=1e-14)
    stub.CloseSession(service_pb2.CloseSessionRequest(session_id=session), timeout=30)
