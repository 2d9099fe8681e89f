"""Two-phase steps over a real gRPC server: a client-side loss trains a session exactly as Step
with that loss would, exactly once under retried phases; bad input is named and applies nothing."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from .conftest import SPEC, batch, initial_parameters
from gradserve import Client, FailedPrecondition, InvalidArgument, NotFound
from gradserve.codec import encode_tensor
from gradserve.rpc.status import from_rpc_error
from gradserve.v1 import service_pb2


def mean_cross_entropy(labels):
    """(mean softmax cross-entropy, dL/d logits) in numpy: the built-in loss, on the client."""
    def loss(logits):
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(len(labels))
        grad = np.exp(log_p)
        grad[rows, labels] -= 1
        return float(-log_p[rows, labels].mean()), grad / len(labels)
    return loss


def new_session(client):
    return client.create_session(SPEC, initial_parameters(), optimizer={"name": "momentum", "lr": 0.05},
                                 num_workers=2)


def test_train_step_equals_step_with_the_same_loss(client):
    reference, two_phase = new_session(client), new_session(client)
    for seed in range(4):
        x, y = batch(seed=seed)
        expected = client.step(reference, x, y)
        result = client.train_step(two_phase, x, mean_cross_entropy(y))
        assert result.version == expected.version and result.applied and not result.duplicate
        assert result.loss == pytest.approx(expected.loss, rel=1e-5)
        assert result.samples == 12 and result.grad_norm == pytest.approx(expected.grad_norm, rel=1e-4)
    (_, want), (_, got) = client.pull_parameters(reference), client.pull_parameters(two_phase)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_phases_retried_apply_once(client, session):
    x, y = batch()
    forward = client.step_forward(session, x, step_id=5)
    again = client.step_forward(session, x, step_id=5)  # a retry of phase one: the same outputs
    np.testing.assert_array_equal(again.output, forward.output)
    value, grad = mean_cross_entropy(y)(forward.output)
    first = client.step_backward(session, 5, grad, value)
    retried = client.step_backward(session, 5, grad, value)
    assert (first.version, first.duplicate) == (1, False)
    assert (retried.version, retried.duplicate, retried.loss) == (1, True, first.loss)
    replayed = client.step_forward(session, x, step_id=5)
    assert replayed.duplicate and replayed.output is None
    assert client.train_step(session, x, mean_cross_entropy(y), step_id=5).duplicate
    assert client.pull_parameters(session)[0] == 1


def test_a_backward_without_its_forward_is_refused_and_train_step_runs_it_again(client, session):
    x, y = batch()
    with pytest.raises(FailedPrecondition) as refused:
        client.step_backward(session, 3, np.zeros((12, 3), np.float32), 1.0)
    assert refused.value.field == "step_id" and "forward again" in str(refused.value)
    forward = client.step_forward(session, x, step_id=4)
    client.step(session, x, y, step_id=6)  # sync: the parameters moved since step 4's forward
    with pytest.raises(FailedPrecondition, match="moved"):
        client.step_backward(session, 4, mean_cross_entropy(y)(forward.output)[1], 1.0)
    assert client.pull_parameters(session)[0] == 1
    client.step_forward(session, x, step_id=7)
    client.step(session, x, y, step_id=8)
    assert client.train_step(session, x, mean_cross_entropy(y), step_id=7).version == 3  # forward re-run


def raw_backward(stub, session_id, step_id, tensors, loss=0.5):
    header = service_pb2.StepBackwardHeader(session_id=session_id, step_id=step_id, loss=loss)
    for name, value in tensors.items():
        header.tensors.add(name=name, tensor=encode_tensor(value))
    return list(stub.StepBackward(iter([service_pb2.StepBackwardRequest(header=header)]), timeout=60))


def raw_forward(stub, session_id, step_id, tensors):
    header = service_pb2.StepForwardHeader(session_id=session_id, step_id=step_id)
    for name, value in tensors.items():
        header.tensors.add(name=name, tensor=encode_tensor(value))
    return list(stub.StepForward(iter([service_pb2.StepForwardRequest(header=header)]), timeout=60))


BAD_BACKWARDS = {
    "wrong shape": ({"output_gradient": np.zeros((12, 2), np.float32)}, 0.5, "output_gradient"),
    "wrong dtype": ({"output_gradient": np.zeros((12, 3), np.float64)}, 0.5, "output_gradient"),
    "nan": ({"output_gradient": np.full((12, 3), np.nan, np.float32)}, 0.5, "output_gradient"),
    "inf": ({"output_gradient": np.full((12, 3), np.inf, np.float32)}, 0.5, "output_gradient"),
    "missing": ({}, 0.5, "output_gradient"),
    "labels too": ({"output_gradient": np.zeros((12, 3), np.float32), "batch.y": np.zeros(12, np.int64)},
                   0.5, "batch.y"),
    "loss nan": ({"output_gradient": np.zeros((12, 3), np.float32)}, float("nan"), "loss"),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARDS))
def test_bad_backward_is_invalid_argument_naming_the_field_and_applies_nothing(client, stub, session, case):
    tensors, loss, field = BAD_BACKWARDS[case]
    x, y = batch()
    forward = client.step_forward(session, x, step_id=1)
    with pytest.raises(grpc.RpcError) as refused:
        raw_backward(stub, session, 1, tensors, loss)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(refused.value).field == field
    assert client.pull_parameters(session)[0] == 0
    value, grad = mean_cross_entropy(y)(forward.output)  # the held forward survived the refusal
    assert client.step_backward(session, 1, grad, value).version == 1


def test_bad_forward_is_named(client, stub, session):
    x, y = batch()
    for tensors, field in (({"batch.x": x, "batch.y": y}, "batch.y"), ({}, "batch.x"),
                           ({"batch.x": x[:, :4]}, "batch.x"), ({"batch.x": x, "extra": x}, "extra")):
        with pytest.raises(grpc.RpcError) as refused:
            raw_forward(stub, session, 1, tensors)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert from_rpc_error(refused.value).field == field
    with pytest.raises(InvalidArgument) as refused:
        client.step_forward(session, x, step_id=0)
    assert refused.value.field == "step_id"
    with pytest.raises(NotFound):
        client.step_forward("no-such-session", x)
    assert client.step(session, x, y).applied  # the server stayed up


def test_forward_answers_the_training_mode_output_chunked(client):
    """Outputs over 1 MiB come back in chunks; they equal the session's forward (no dropout); a
    large output gradient goes and a large input gradient comes back in chunks."""
    session = new_session(client)
    x = np.random.default_rng(3).standard_normal((100_000, 6)).astype(np.float32)
    forward = client.step_forward(session, x)
    version, expected = client.forward_session(session, x)
    assert forward.version == version == 0
    np.testing.assert_array_equal(forward.output, expected)
    y = (np.arange(len(x)) % 3).astype(np.int64)
    value, grad = mean_cross_entropy(y)(forward.output)  # 1.2 MB: chunked on the way back too
    result = client.step_backward(session, forward.step_id, grad, value, input_gradient=True)
    assert result.applied and result.input_gradient.shape == x.shape  # 2.4 MB answered in chunks
    client.close_session(session)


def test_a_backward_sent_again_after_its_answer_applies_nothing(gateway):
    """What a retry after a lost answer does: the same step id reaches the service again, and the
    step log answers it (a client with retries on)."""
    with Client(gateway[1], timeout=60, retries=2) as client:
        session = new_session(client)
        x, y = batch()
        result = client.train_step(session, x, mean_cross_entropy(y))
        again = client.step_backward(session, result.step_id, None, 0.0)
        assert again.duplicate and again.version == result.version == 1
        client.close_session(session)
