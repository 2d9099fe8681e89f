"""Integer arguments the request cannot hold raise the SDK's InvalidArgument naming the field, before
anything is sent (the Client below points at a port nobody listens on: no call is ever made)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

import gradserve
from gradserve import mlp
from gradserve.fields import build
from gradserve.v1 import model_pb2, service_pb2

SPEC = mlp(4, [3], 2)
PARAMS = {"fc0.weight": np.zeros((4, 3), np.float32), "fc0.bias": np.zeros(3, np.float32),
          "fc1.weight": np.zeros((3, 2), np.float32), "fc1.bias": np.zeros(2, np.float32)}
X, Y = np.zeros((2, 4), np.float32), np.zeros(2, np.int64)
OUT_OF_RANGE = (-1, 2**64, -(2**70))
NOT_INTEGERS = (1.5, 2.0, "3", True, np.float64(1.0))


@pytest.fixture(scope="module")
def client():
    with socket.socket() as probe:  # a free port, closed again: nothing answers there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with gradserve.Client(f"127.0.0.1:{port}", timeout=5, retries=0) as client:
        yield client


CALLS = {
    "micro_batch_size": lambda c, v: c.compute_gradients(SPEC, PARAMS, X, Y, micro_batch_size=v),
    "seed": lambda c, v: c.compute_gradients(SPEC, PARAMS, X, Y, seed=v),
    "num_workers": lambda c, v: c.create_session(SPEC, num_workers=v),
    "staleness": lambda c, v: c.create_session(SPEC, staleness=v),
    "ps_shards": lambda c, v: c.create_session(SPEC, ps_shards=v),
    "checkpoint_every_steps": lambda c, v: c.create_session(SPEC, checkpoint_every_steps=v),
    "step_id": lambda c, v: c.step("some-session", X, Y, step_id=v),
}
CREATE_SEED = ("seed", lambda c, v: c.create_session(SPEC, seed=v))


@pytest.mark.parametrize("value", OUT_OF_RANGE + NOT_INTEGERS, ids=repr)
@pytest.mark.parametrize("field, call", [*CALLS.items(), CREATE_SEED], ids=[*CALLS, "create_session seed"])
def test_bad_integer_raises_invalid_argument_naming_the_field(client, field, call, value):
    with pytest.raises(gradserve.InvalidArgument) as caught:
        call(client, value)
    assert caught.value.field == field
    assert caught.value.code == gradserve.InvalidArgument.code  # the SDK's own, not a status
    assert field in str(caught.value)


def test_a_refused_step_id_does_not_move_the_next_one(client):
    with pytest.raises(gradserve.InvalidArgument):
        client.step("some-session", X, Y, step_id=2**64)
    assert client._step_ids.claim("some-session", None) == 1


def test_largest_values_and_numpy_integers_are_accepted():
    header = build(service_pb2.StepHeader, session_id="s", step_id=np.uint64(2**64 - 1))
    assert header.step_id == 2**64 - 1
    assert build(service_pb2.SessionConfig, seed=np.int64(7), num_workers=0).seed == 7


def test_signed_fields_use_their_own_range():
    assert build(model_pb2.Node, units=-(2**63)).units == -(2**63)
    with pytest.raises(gradserve.InvalidArgument) as caught:
        build(model_pb2.Node, units=2**63)
    assert caught.value.field == "units"


def test_wrong_type_for_a_string_field_names_it():
    with pytest.raises(gradserve.InvalidArgument) as caught:
        build(service_pb2.StepHeader, session_id=12)
    assert caught.value.field == "session_id"
