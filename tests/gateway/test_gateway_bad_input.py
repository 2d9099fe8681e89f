"""Malformed requests: the right status code, a message and BadRequest naming the field, a server
that still answers, and a session whose parameters and version did not change."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import gradserve
import gradserve.rpc.status
from gradserve.rpc.options import CHANNEL_OPTIONS
from gradserve.v1 import service_pb2, service_pb2_grpc, tensor_pb2
from gradserve_services.gateway import rpc_status_for

from .conftest import SPEC, batch, initial_parameters

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def raw_tensor(name, dtype="float32", shape=(12, 6), data=None, chunked=False):
    if data is None:
        data = b"\0" * (int(np.prod(shape)) * 4) if all(d >= 0 for d in shape) else b""
    return tensor_pb2.NamedTensor(name=name, tensor=tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data),
                                  chunked=chunked)


def labels():
    x, y = batch()
    return raw_tensor("batch.y", dtype="int64", shape=y.shape, data=y.tobytes())


def raw_step(stub, session, tensors, step_id=1, chunks=()):
    header = service_pb2.StepHeader(session_id=session, step_id=step_id, tensors=tensors)
    messages = [service_pb2.StepRequest(header=header)]
    messages += [service_pb2.StepRequest(chunk=tensor_pb2.TensorChunk(index=i, offset=o, data=d))
                 for i, o, d in chunks]
    return stub.Step(iter(messages), timeout=30)


def violation_fields(error: grpc.RpcError):
    """Fields of the BadRequest detail, parsed the way the SDK does."""
    return gradserve.rpc.status.field_violations(error)


def assert_rejected(call, code, field):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, error.details()
    assert field in error.details()
    assert violation_fields(error)[0][0] == field
    return error


@pytest.fixture()
def unchanged(client, session):
    """Asserts after the test that the session still answers with the same version and parameters."""
    client.step(session, *batch(seed=9), step_id=100)
    before = client.pull_parameters(session)
    yield session
    after = client.pull_parameters(session)
    assert after[0] == before[0] == 1
    for name, value in before[1].items():
        np.testing.assert_array_equal(after[1][name], value)
    assert client.step(session, *batch(seed=10), step_id=101).version == 2  # still usable


STEP_CASES = {
    "wrong byte length": ([raw_tensor("batch.x", data=b"\0" * 10), labels()], INVALID, "batch.x"),
    "unknown dtype": ([raw_tensor("batch.x", dtype="complex64"), labels()], INVALID, "batch.x"),
    "negative dim": ([raw_tensor("batch.x", shape=(-12, 6)), labels()], INVALID, "batch.x"),
    "absurd dims": ([raw_tensor("batch.x", shape=(1 << 40, 1 << 40), data=b""), labels()],
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "batch.x"),
    "rank too high": ([raw_tensor("batch.x", shape=(1,) * 9, data=b"\0" * 4), labels()], INVALID, "batch.x"),
    "missing labels": ([raw_tensor("batch.x")], INVALID, "batch.y"),
    "unexpected tensor": ([raw_tensor("batch.x"), labels(), raw_tensor("batch.z")], INVALID, "batch.z"),
    "tensor sent twice": ([raw_tensor("batch.x"), raw_tensor("batch.x"), labels()], INVALID, "batch.x"),
    "shape disagrees with spec": ([raw_tensor("batch.x", shape=(12, 5)), labels()], INVALID, "batch.x"),
    "labels as floats": ([raw_tensor("batch.x"), raw_tensor("batch.y", shape=(12,))], INVALID, "batch.y"),
}


@pytest.mark.parametrize("case", STEP_CASES)
def test_malformed_step_tensors(stub, unchanged, case):
    tensors, code, field = STEP_CASES[case]
    assert_rejected(lambda: raw_step(stub, unchanged, tensors), code, field)


def test_chunk_gap_and_early_end(stub, unchanged):
    x, y = batch()
    header = [raw_tensor("batch.x", data=b"", chunked=True), labels()]
    raw = x.tobytes()
    assert_rejected(lambda: raw_step(stub, unchanged, header, chunks=[(0, 8, raw[8:])]), INVALID, "batch.x")
    assert_rejected(lambda: raw_step(stub, unchanged, header, chunks=[(0, 0, raw[:100])]), INVALID, "batch.x")
    assert_rejected(lambda: raw_step(stub, unchanged, header, chunks=[(1, 0, raw)]), INVALID, "chunk.index")
    too_long = raw + b"\0" * 4
    assert_rejected(lambda: raw_step(stub, unchanged, header, chunks=[(0, 0, too_long)]), INVALID, "batch.x")


@pytest.mark.parametrize(
    "make_batch, field",
    [
        (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype(np.float32), y), "batch.x"),
        (lambda x, y: (np.full_like(x, np.inf), y), "batch.x"),
        (lambda x, y: (x, y + 3), "batch.y"),
        (lambda x, y: (x, y - 4), "batch.y"),
        (lambda x, y: (x[:0], y[:0]), "batch.x"),
        (lambda x, y: (x[:, :5], y), "batch.x"),
        (lambda x, y: (x.astype(np.float64), y), "batch.x"),
        (lambda x, y: (x, y[:5]), "batch.y"),
    ],
    ids=["nan input", "inf input", "label too large", "negative label", "empty batch", "too few features",
         "dtype differs from parameters", "too few labels"],
)
def test_bad_batch_values(client, unchanged, make_batch, field):
    x, y = make_batch(*batch())
    with pytest.raises(gradserve.InvalidArgument) as caught:
        client.step(unchanged, x, y, step_id=50)
    assert caught.value.field == field and field in str(caught.value)


def test_step_id_zero_is_rejected(stub, unchanged):
    x, y = batch()
    tensors = [raw_tensor("batch.x", data=x.tobytes()), labels()]
    assert_rejected(lambda: raw_step(stub, unchanged, tensors, step_id=0), INVALID, "step_id")


def test_unknown_session_everywhere(client):
    x, y = batch()
    calls = [
        lambda: client.step("no-such-session", x, y),
        lambda: client.pull_parameters("no-such-session"),
        lambda: client.save_checkpoint("no-such-session"),
        lambda: client.restore_checkpoint("no-such-session"),
        lambda: client.close_session("no-such-session"),
        lambda: list(client.stream_steps("no-such-session", [(x, y)])),
    ]
    for call in calls:
        with pytest.raises(gradserve.NotFound) as caught:
            call()
        assert caught.value.field == "session_id"


def with_node(**changes):
    spec = {**SPEC, "nodes": [dict(node) for node in SPEC["nodes"]]}
    spec["nodes"][0].update(changes)
    return spec


SPEC_CASES = {
    "unknown op": (with_node(op="conv2d"), "fc1"),
    "negative units": (with_node(units=-3), "fc1"),
    "absurd units": (with_node(units=1 << 40), "fc1"),
    "attribute the op lacks": (with_node(rate=0.5), "fc1"),
    "cyclic graph": ({**SPEC, "nodes": [
        {"name": "a", "op": "dense", "inputs": ["b"], "units": 4},
        {"name": "b", "op": "relu", "inputs": ["a"]},
        {"name": "logits", "op": "dense", "inputs": ["b"], "units": 3}]}, None),
    "dangling input": (with_node(inputs=["nowhere"]), "fc1"),
    "unknown loss": ({**SPEC, "loss": "hinge"}, "loss"),
    "zero input features": ({**SPEC, "input_features": 0}, "input_features"),
}


@pytest.mark.parametrize("case", SPEC_CASES)
def test_bad_specs_create_nothing(client, case):
    spec, field = SPEC_CASES[case]
    sessions_before = len(client.list_sessions())
    with pytest.raises(gradserve.InvalidArgument) as caught:
        client.create_session(spec, seed=0)
    if field is None:  # a cycle is reported at one of its nodes
        assert caught.value.field in ("a", "b")
    else:
        assert caught.value.field == field
    assert caught.value.field in str(caught.value)
    with pytest.raises(gradserve.InvalidArgument):
        client.compute_gradients(spec, initial_parameters(), *batch())
    assert len(client.list_sessions()) == sessions_before


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda p: p.pop("logits.bias"), "parameters.logits.bias"),
        (lambda p: p["fc1.weight"].__setitem__((0, 0), np.nan), "parameters.fc1.weight"),
        (lambda p: p["fc1.bias"].__setitem__(0, np.inf), "parameters.fc1.bias"),
        (lambda p: p.__setitem__("fc1.weight", p["fc1.weight"][:, :4]), "parameters.fc1.weight"),
        (lambda p: p.__setitem__("extra", np.zeros(3, np.float32)), "parameters.extra"),
    ],
    ids=["missing parameter", "nan parameter", "inf parameter", "wrong shape", "unknown parameter"],
)
def test_bad_parameters(client, change, field):
    params = initial_parameters()
    change(params)
    sessions_before = len(client.list_sessions())
    for call in (lambda: client.create_session(SPEC, params), lambda: client.compute_gradients(SPEC, params, *batch())):
        with pytest.raises(gradserve.InvalidArgument) as caught:
            call()
        assert caught.value.field == field and field in str(caught.value)
    assert len(client.list_sessions()) == sessions_before


def test_bad_session_config(client):
    for options, field in [({"consistency": "eventual"}, "config.consistency"),
                           ({"optimizer": {"name": "rmsprop"}}, "optimizer.name"),
                           ({"optimizer": {"lr": -1.0}}, "optimizer.lr"),
                           ({"dtype": "float16"}, "dtype")]:
        with pytest.raises(gradserve.InvalidArgument) as caught:
            client.create_session(SPEC, **options)
        assert field in caught.value.field, (options, caught.value)


def test_oversized_message_is_resource_exhausted(gateway, client, unchanged):
    """A single message above the service's 8 MiB limit is refused by gRPC itself."""
    rows = (9 << 20) // 24
    tensors = [raw_tensor("batch.x", shape=(rows, 6)), raw_tensor("batch.y", "int64", (rows,), b"\0" * rows * 8)]
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(gateway[1], options=options) as channel:
        stub = service_pb2_grpc.GradserveStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            raw_step(stub, unchanged, tensors)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_request_bytes_cap(executor):
    """Total tensor bytes above max_request_bytes: RESOURCE_EXHAUSTED naming the tensor, no buffer."""
    from gradserve_services.gateway import create_server

    server, port = create_server(executor, max_request_bytes=1 << 20)
    try:
        with gradserve.Client(f"127.0.0.1:{port}", retries=0) as small:
            x = np.zeros((1 << 16, 6), np.float32)
            with pytest.raises(gradserve.ResourceExhausted) as caught:
                small.compute_gradients(SPEC, initial_parameters(), x, np.zeros(1 << 16, np.int64))
            assert caught.value.field == "batch.x"
    finally:
        server.stop(grace=1)


def test_status_mapping_covers_every_error_class():
    from gradserve_services import errors

    expected = {
        errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        errors.SpecError: grpc.StatusCode.INVALID_ARGUMENT,
        errors.NotFound: grpc.StatusCode.NOT_FOUND,
        errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
        errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
        errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
        errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
        errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    for cls, code in expected.items():
        status = rpc_status_for(cls("what went wrong", "some.field"))
        assert status.code == code and "some.field" in status.details
