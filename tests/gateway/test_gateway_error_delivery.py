"""Every error reaches the client as its own status: requests over the message limit are answered
and counted RESOURCE_EXHAUSTED, huge echoed values do not push the status past gRPC's metadata
limits, and nothing reveals where the server keeps its files."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest

import gradserve
import gradserve.rpc.status
from gradserve.v1 import service_pb2, service_pb2_grpc, tensor_pb2
from gradserve_services import metrics
from gradserve_services.gateway.status import DESCRIPTION_BUDGET, FIELD_BUDGET

from .conftest import SPEC, batch, initial_parameters

HUGE = 10_000  # characters of an echoed value: without caps its status needs > 16 KiB of metadata
WIDE_OPEN = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
# What a status may hold at most once capped: field, ": ", description, and each elision note.
MAX_DETAILS = FIELD_BUDGET + 2 + DESCRIPTION_BUDGET


def requests_counted(method: str, code: str) -> float:
    value = metrics.REGISTRY.get_sample_value("gradserve_rpc_requests_total", {"method": method, "code": code})
    return value or 0.0


def wait_for_count(method: str, code: str, expected: float, timeout_s: float = 30.0) -> float:
    """The counter once it reaches `expected` (recorded by the server thread), or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while requests_counted(method, code) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return requests_counted(method, code)


def unexpected_failures(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "failed unexpectedly" in r.getMessage()]


def inline_step(session: str, megabytes: int) -> list:
    """A Step whose only message carries `megabytes` MiB inline: over the 8 MiB message limit."""
    rows = (megabytes << 20) // 32
    x = tensor_pb2.NamedTensor(name="batch.x", tensor=tensor_pb2.Tensor(
        dtype="float32", shape=(rows, 6), data=bytes(rows * 24)))
    y = tensor_pb2.NamedTensor(name="batch.y", tensor=tensor_pb2.Tensor(
        dtype="int64", shape=(rows,), data=bytes(rows * 8)))
    header = service_pb2.StepHeader(session_id=session, step_id=1, tensors=[x, y])
    return [service_pb2.StepRequest(header=header)]


# ----- item: a request over the message limit -------------------------------------------------


def test_oversize_requests_are_answered_and_counted_resource_exhausted(gateway, client, session, caplog):
    caplog.set_level(logging.WARNING)
    before = {method: requests_counted(method, "RESOURCE_EXHAUSTED") for method in ("Step", "StreamSteps")}
    others_before = {code: requests_counted("Step", code) for code in ("INTERNAL", "UNKNOWN", "INVALID_ARGUMENT")}
    sizes_mib = (9, 12, 15, 9, 12)
    with grpc.insecure_channel(gateway[1], options=WIDE_OPEN) as channel:
        stub = service_pb2_grpc.GradserveStub(channel)
        for megabytes in sizes_mib:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Step(iter(inline_step(session, megabytes)), timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
            assert "message limit" in caught.value.details()
            assert gradserve.rpc.status.field_violations(caught.value)[0][0] == "request"
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StreamSteps(iter(inline_step(session, 10)), timeout=60))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    expected_steps = before["Step"] + len(sizes_mib)
    assert wait_for_count("Step", "RESOURCE_EXHAUSTED", expected_steps) == expected_steps
    assert wait_for_count("StreamSteps", "RESOURCE_EXHAUSTED", before["StreamSteps"] + 1) == before["StreamSteps"] + 1
    assert {code: requests_counted("Step", code) for code in others_before} == others_before
    assert unexpected_failures(caplog) == []
    assert client.pull_parameters(session)[0] == 0  # nothing applied, the server still answers


def test_a_call_cut_off_by_grpc_is_not_an_unexpected_failure(gateway, client, session, caplog):
    """Beyond gRPC's own receive limit gRPC ends the call under the servicer: no traceback, no
    INTERNAL; the caller still gets RESOURCE_EXHAUSTED."""
    caplog.set_level(logging.WARNING)
    internal_before = requests_counted("Step", "INTERNAL")
    with grpc.insecure_channel(gateway[1], options=WIDE_OPEN) as channel:
        stub = service_pb2_grpc.GradserveStub(channel)
        for _ in range(4):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Step(iter(inline_step(session, 20)), timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.pull_parameters(session)[0] == 0  # answered after the four, so they were recorded
    assert requests_counted("Step", "INTERNAL") == internal_before
    assert unexpected_failures(caplog) == []


def test_client_cancelling_mid_upload_is_not_an_unexpected_failure(gateway, client, session, caplog):
    """Counted CANCELLED, or INVALID_ARGUMENT when gRPC showed the servicer the stream's end before
    the cancellation (the two reach it in either order): never INTERNAL, never logged as a fault."""
    caplog.set_level(logging.WARNING)
    codes = ("CANCELLED", "INVALID_ARGUMENT", "INTERNAL", "UNKNOWN")
    before = {code: requests_counted("Step", code) for code in codes}
    x = np.zeros((1 << 16, 6), np.float32)  # chunked: the header leaves first, then the call is cancelled
    header = service_pb2.StepHeader(session_id=session, step_id=1, tensors=[tensor_pb2.NamedTensor(
        name="batch.x", tensor=tensor_pb2.Tensor(dtype="float32", shape=x.shape), chunked=True)])

    def requests():
        yield service_pb2.StepRequest(header=header)
        time.sleep(0.5)
        future.cancel()
        yield service_pb2.StepRequest(chunk=tensor_pb2.TensorChunk(index=0, offset=0, data=bytes(1024)))

    with grpc.insecure_channel(gateway[1]) as channel:
        future = service_pb2_grpc.GradserveStub(channel).Step.future(requests(), timeout=60)
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=60)
    deadline = time.monotonic() + 30
    while sum(requests_counted("Step", code) - before[code] for code in codes) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    counted = {code: requests_counted("Step", code) - before[code] for code in codes}
    assert counted["CANCELLED"] + counted["INVALID_ARGUMENT"] == 1, counted
    assert counted["INTERNAL"] == counted["UNKNOWN"] == 0, counted
    assert unexpected_failures(caplog) == []
    assert client.pull_parameters(session)[0] == 0


# ----- item: huge echoed values -------------------------------------------------------------------


def assert_delivered(error: gradserve.GradserveError, cls, field_start: str, *, echoed: bool = True):
    """`error` is the service's status (not a transport error), capped, naming the field."""
    assert type(error) is cls, error
    assert error.field.startswith(field_start), error.field
    assert len(error.field) <= FIELD_BUDGET
    assert len(error.message) <= len(f"{cls.code.name}: ") + MAX_DETAILS
    assert ("characters left out" in error.message) == echoed, error.message


def test_huge_session_id_is_not_found(client):
    for call in (lambda sid: client.step(sid, *batch(), step_id=1), client.pull_parameters,
                 client.save_checkpoint, client.restore_checkpoint, client.close_session):
        with pytest.raises(gradserve.GradserveError) as caught:
            call("s" * HUGE)
        assert_delivered(caught.value, gradserve.NotFound, "session_id")


def test_huge_tensor_name_is_invalid_argument(client, session, stub):
    x, y = batch()
    with pytest.raises(gradserve.GradserveError) as caught:
        client.compute_gradients(SPEC, {**initial_parameters(), "z" * HUGE: x}, x, y)
    assert_delivered(caught.value, gradserve.InvalidArgument, "parameters.zzz")
    tensors = [tensor_pb2.NamedTensor(name=name, tensor=tensor_pb2.Tensor(dtype=a.dtype.name, shape=a.shape,
                                                                          data=a.tobytes()))
               for name, a in (("batch.x", x), ("batch.y", y), ("batch." + "z" * HUGE, x))]
    header = service_pb2.StepHeader(session_id=session, step_id=1, tensors=tensors)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Step(iter([service_pb2.StepRequest(header=header)]), timeout=60)
    assert_delivered(gradserve.rpc.status.from_rpc_error(caught.value), gradserve.InvalidArgument, "batch.zzz")
    assert client.pull_parameters(session)[0] == 0


@pytest.mark.parametrize("change, field_start", [
    (lambda spec: spec["nodes"][0].update(op="o" * HUGE), "fc"),
    (lambda spec: spec.update(loss="l" * HUGE), "loss"),
    (lambda spec: spec.update(output="n" * HUGE), "output"),
], ids=["op", "loss", "output"])
def test_huge_spec_values_are_invalid_argument(client, change, field_start):
    spec = {**SPEC, "nodes": [dict(node) for node in SPEC["nodes"]]}
    change(spec)
    x, y = batch()
    with pytest.raises(gradserve.GradserveError) as caught:
        client.compute_gradients(spec, initial_parameters(), x, y)
    assert_delivered(caught.value, gradserve.InvalidArgument, field_start)


@pytest.mark.parametrize("options, field_start", [
    ({"optimizer": {"name": "o" * HUGE}}, "optimizer.name"),
    ({"dtype": "d" * HUGE}, "config.init.dtype"),
    ({"consistency": "c" * HUGE}, "config.consistency"),
    ({"compression": "c" * HUGE}, "config.compression"),
], ids=["optimizer name", "init dtype", "consistency", "compression"])
def test_huge_session_config_values_are_invalid_argument(client, options, field_start):
    sessions_before = len(client.list_sessions())
    with pytest.raises(gradserve.GradserveError) as caught:
        client.create_session(SPEC, **options)
    assert_delivered(caught.value, gradserve.InvalidArgument, field_start)
    assert len(client.list_sessions()) == sessions_before


def test_huge_tensor_dtype_and_checkpoint_name_are_invalid_argument(client, session, stub):
    x, y = batch()
    tensors = [tensor_pb2.NamedTensor(name="batch.x", tensor=tensor_pb2.Tensor(dtype="f" * HUGE, shape=x.shape,
                                                                               data=x.tobytes())),
               tensor_pb2.NamedTensor(name="batch.y", tensor=tensor_pb2.Tensor(dtype="int64", shape=y.shape,
                                                                               data=y.tobytes()))]
    header = service_pb2.StepHeader(session_id=session, step_id=1, tensors=tensors)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Step(iter([service_pb2.StepRequest(header=header)]), timeout=60)
    assert_delivered(gradserve.rpc.status.from_rpc_error(caught.value), gradserve.InvalidArgument, "batch.x")
    with pytest.raises(gradserve.GradserveError) as caught:
        client.restore_checkpoint(session, "v" * HUGE)
    assert_delivered(caught.value, gradserve.InvalidArgument, "checkpoint", echoed=False)
    assert client.pull_parameters(session)[0] == 0


# ----- item: checkpoints name no server paths -----------------------------------------------------


def test_missing_checkpoint_message_shows_no_server_path(client, session, gateway):
    server, _ = gateway
    checkpoint_dir = server.sessions.checkpoint_dir
    client.save_checkpoint(session)
    with pytest.raises(gradserve.NotFound) as caught:
        client.restore_checkpoint(session, "v000000000009.npz")
    assert caught.value.field == "checkpoint"
    assert "v000000000009.npz" in caught.value.message
    assert checkpoint_dir not in caught.value.message and "/" not in caught.value.message


@pytest.mark.parametrize("name", ["v000000000000.npz\n", "v\u0660\u0660\u0660\u0660\u0660\u0660"
                                  "\u0660\u0660\u0660\u0660\u0660\u0660.npz"], ids=["trailing newline", "arabic digits"])
def test_checkpoint_name_must_match_in_full(client, session, name):
    assert client.save_checkpoint(session).name == "v000000000000.npz"
    with pytest.raises(gradserve.InvalidArgument) as caught:
        client.restore_checkpoint(session, name)
    assert caught.value.field == "checkpoint"


# ----- the SDK's own checks inside a stream ------------------------------------------------------


def test_stream_steps_with_a_bad_step_id_answers_the_steps_before_it_then_raises(client, session):
    """gRPC reads the request stream in a thread of its own; the bad step id must still reach the
    caller as InvalidArgument naming step_id (not CANCELLED), after the steps before it."""
    batches = [(1, *batch(seed=1)), (2, *batch(seed=2)), (-3, *batch(seed=3)), (4, *batch(seed=4))]
    answered = []
    with pytest.raises(gradserve.InvalidArgument) as caught:
        for result in client.stream_steps(session, batches, timeout=60):
            answered.append(result.step_id)
    assert caught.value.field == "step_id"
    assert answered == [1, 2]
    assert client.pull_parameters(session)[0] == 2  # the step after the bad one was never sent
