"""Hypothesis against the model-as-a-function RPCs through a real gRPC server (127.0.0.1, port 0,
over the in-process executor), at the protobuf message level: vector-Jacobian requests with
mutated output gradients (shape, dtype, NaN/Inf, missing, with labels too, input_gradient asked
where it cannot be), Forward with unknown node names, two-phase steps with mutated output
gradients and losses. Every answer is OK or INVALID_ARGUMENT naming exactly the field at fault,
never an internal error; a refused backward applies nothing, and at the end the session's version
is exactly the number of backwards accepted."""

from __future__ import annotations

import math
import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradserve import Client, mlp
from gradserve.rpc.options import CHANNEL_OPTIONS
from gradserve.rpc.status import from_rpc_error
from gradserve.spec import spec_to_proto
from gradserve.v1 import service_pb2, service_pb2_grpc, tensor_pb2
from gradserve_services.cluster import LocalExecutor
from gradserve_services.engine import Model
from gradserve_services.gateway import create_server

SETTINGS = dict(deadline=None, database=None, derandomize=not os.environ.get("GRADSERVE_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SPEC = mlp(5, [7], 3)
ROWS = 6
NODE_NAMES = [node["name"] for node in SPEC["nodes"]]


@pytest.fixture(scope="module")
def live():
    executor = LocalExecutor(num_workers=1)
    server, port = create_server(executor)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    client = Client(f"127.0.0.1:{port}", timeout=30, retries=0)
    session = client.create_session(SPEC, seed=3, optimizer={"name": "sgd", "lr": 0.01})
    state = {"accepted": 0, "step_id": 0, "client": client, "session": session}
    yield service_pb2_grpc.GradserveStub(channel), state
    client.close()
    channel.close()
    server.stop(grace=1)
    executor.shutdown()


def named(name: str, array: np.ndarray) -> tensor_pb2.NamedTensor:
    return tensor_pb2.NamedTensor(name=name, tensor=tensor_pb2.Tensor(dtype=array.dtype.name, shape=list(array.shape),
                                                                      data=array.tobytes()))


def batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((ROWS, 5)).astype(np.float32), (np.arange(ROWS) % 3).astype(np.int64)


VALID = {"rows": ROWS, "width": 3, "dtype": "float32", "special": None, "ndim": 2, "missing": False}
WRONG = {"rows": [0, 1, ROWS + 1], "width": [1, 4], "dtype": ["float64", "int64", "int32"],
         "special": [math.nan, math.inf, -math.inf], "ndim": [1, 3], "missing": [True]}


@st.composite
def gradients(draw) -> dict:
    """A valid output gradient (one in three), or one with one or two things wrong with it."""
    change = dict(VALID)
    if draw(st.integers(0, 2)):
        for key in draw(st.lists(st.sampled_from(sorted(WRONG)), min_size=1, max_size=2, unique=True)):
            change[key] = draw(st.sampled_from(WRONG[key]))
    return change



def output_gradient(change) -> np.ndarray | None:
    """The mutated gradient, or None when it is left out."""
    if change["missing"]:
        return None
    shape = {2: (change["rows"], change["width"]), 1: (change["rows"] * change["width"],),
             3: (change["rows"], change["width"], 1)}[change["ndim"]]
    grad = np.random.default_rng(1).standard_normal(shape).astype(change["dtype"])
    if change["special"] is not None and grad.size and grad.dtype.kind == "f":
        grad.flat[grad.size // 2] = change["special"]
    return grad


def is_valid(grad) -> bool:
    return grad is not None and grad.dtype == np.float32 and grad.shape == (ROWS, 3) and bool(np.isfinite(grad).all())


def field_of(error: grpc.RpcError) -> str:
    return from_rpc_error(error).field


@settings(max_examples=200, **SETTINGS)
@given(change=gradients(), with_labels=st.booleans(), ask_input=st.booleans())
def test_vector_jacobian_requests_are_answered_or_name_the_field(live, change, with_labels, ask_input):
    stub, _ = live
    x, y = batch()
    params = Model(SPEC).init_parameters(seed=0)
    grad = output_gradient(change)
    header = service_pb2.ComputeGradientsHeader(model=spec_to_proto(SPEC), input_gradient=ask_input)
    header.tensors.extend([named(f"parameters.{k}", v) for k, v in params.items()] + [named("batch.x", x)])
    if grad is not None:
        header.tensors.append(named("output_gradient", grad))
    if with_labels:
        header.tensors.append(named("batch.y", y))
    request = iter([service_pb2.ComputeGradientsRequest(header=header)])
    if grad is None and not with_labels:
        expected = "batch.y"  # neither: the message says labels or an output gradient
    elif grad is None:
        expected = "input_gradient" if ask_input else None  # a plain built-in-loss request
    elif with_labels:
        expected = "output_gradient"  # both
    else:
        expected = None if is_valid(grad) else "output_gradient"
    try:
        answer = list(stub.ComputeGradients(request, timeout=30))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (change, error.details())
        assert field_of(error) == expected, (change, with_labels, ask_input, error.details())
        return
    assert expected is None, (change, with_labels, ask_input)
    assert answer[0].header.count == ROWS


@settings(max_examples=120, **SETTINGS)
@given(nodes=st.lists(st.one_of(st.sampled_from(NODE_NAMES), st.text(max_size=12)), max_size=5),
       on_session=st.booleans())
def test_forward_answers_known_nodes_and_names_the_first_unknown_or_repeated(live, nodes, on_session):
    stub, state = live
    x, _ = batch()
    header = service_pb2.ForwardHeader(nodes=nodes, tensors=[named("batch.x", x)])
    if on_session:
        header.session_id = state["session"]
    else:
        header.model.CopyFrom(spec_to_proto(SPEC))
        header.tensors.extend(named(f"parameters.{k}", v) for k, v in Model(SPEC).init_parameters(seed=0).items())
    unknown = [i for i, name in enumerate(nodes) if name not in NODE_NAMES or name in nodes[:i]]
    try:
        answer = list(stub.Forward(iter([service_pb2.ForwardRequest(header=header)]), timeout=30))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and unknown, (nodes, error.details())
        assert field_of(error) == f"nodes[{unknown[0]}]"
        return
    assert not unknown
    assert [t.name for t in answer[0].header.tensors] == [f"outputs.{n}" for n in (nodes or [SPEC["output"]])]


@settings(max_examples=150, **SETTINGS)
@given(change=gradients(), loss=st.one_of(st.just(0.5), st.floats(allow_nan=True, allow_infinity=True)),
       with_labels=st.sampled_from([False, False, False, True]))
def test_two_phase_backwards_apply_once_or_name_the_field(live, change, loss, with_labels):
    stub, state = live
    client, session = state["client"], state["session"]
    x, y = batch()
    state["step_id"] += 1
    step_id = state["step_id"]
    client.step_forward(session, x, step_id=step_id)  # held: a backward may follow
    grad = output_gradient(change)
    header = service_pb2.StepBackwardHeader(session_id=session, step_id=step_id, loss=loss)
    if grad is not None:
        header.tensors.append(named("output_gradient", grad))
    if with_labels:
        header.tensors.append(named("batch.y", y))
    if with_labels:
        expected = "batch.y"  # not a tensor a backward takes
    elif grad is None:
        expected = "output_gradient"
    elif not math.isfinite(loss):
        expected = "loss"
    else:
        expected = None if is_valid(grad) else "output_gradient"
    version = client.pull_parameters(session)[0]
    try:
        reply = list(stub.StepBackward(iter([service_pb2.StepBackwardRequest(header=header)]), timeout=30))[0]
        reply = reply.header.step
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (change, loss, error.details())
        assert field_of(error) == expected, (change, loss, with_labels, error.details())
        assert client.pull_parameters(session)[0] == version  # nothing applied
        return
    assert expected is None, (change, loss, with_labels)
    state["accepted"] += 1
    assert reply.applied and reply.version == version + 1 == state["accepted"]


def test_the_session_version_is_the_accepted_backwards(live):
    _, state = live
    assert state["accepted"] > 10  # the strategies make valid backwards often enough to matter
    assert state["client"].pull_parameters(state["session"])[0] == state["accepted"]
