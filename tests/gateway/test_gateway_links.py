"""Local rounds and PowerSGD through a real gRPC server: a "local" session trains round by round
(the SDK's local_steps, inner_optimizer), a PowerSGD session steps, and bad settings (H = 0, an
outer lr <= 0, a PowerSGD rank of 0 or above a matrix's smaller side, an unknown compression) are
INVALID_ARGUMENT naming the field, with the server still answering."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import gradserve
from gradserve import mlp

from .conftest import batch

WIDE = mlp(6, [96], 3)  # fc weight 6x96 is small; 96x3 too: give PowerSGD a matrix of its own
MATRIX = mlp(64, [96], 3)
OUTER = {"name": "nesterov", "lr": 0.7, "momentum": 0.9}


def test_a_local_session_trains_round_by_round_and_a_repeated_round_applies_nothing(client):
    session = client.create_session(WIDE, optimizer=OUTER, consistency="local", local_steps=4,
                                    inner_optimizer={"name": "adamw", "lr": 0.01}, num_workers=2)
    x, y = batch(rows=48, seed=3)
    first = client.step(session, x, y, step_id=1)
    again = client.step(session, x, y, step_id=1)
    second = client.step(session, x, y, step_id=2)
    version, _ = client.pull_parameters(session)
    assert (first.version, again.duplicate, second.version, version) == (1, True, 2, 2)
    assert second.loss < first.loss  # the same rows again, after a round trained on them


def test_a_powersgd_session_steps_and_its_bytes_reach_the_metrics(client):
    from gradserve_services.metrics import REGISTRY

    def counted(name):
        return REGISTRY.get_sample_value(name + "_total") or 0.0

    session = client.create_session(MATRIX, optimizer={"name": "sgd", "lr": 0.1},
                                    compression="powersgd", powersgd_rank=2, num_workers=2)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 64)).astype(np.float32), rng.integers(0, 3, 32)
    raw, sent = counted("gradserve_gradient_raw_bytes"), counted("gradserve_gradient_compressed_bytes")
    results = [client.step(session, x, y) for _ in range(3)]
    assert [r.version for r in results] == [1, 2, 3] and results[-1].loss < results[0].loss
    # per worker: the 64x96 weight as P (64x2) and Q (96x2), the rest (96 + 96*3 + 3) as it is
    per_step = 2 * 4 * ((64 + 96) * 2 + 96 + 288 + 3)
    assert counted("gradserve_gradient_compressed_bytes") - sent == 3 * per_step
    assert counted("gradserve_gradient_raw_bytes") - raw == 3 * 2 * 4 * (64 * 96 + 96 + 288 + 3)


@pytest.mark.parametrize("settings, field", [
    ({"consistency": "local", "local_steps": 0, "optimizer": OUTER}, "config.local_steps"),
    ({"consistency": "local", "optimizer": {"name": "nesterov", "lr": 0.0}}, "optimizer.lr"),
    ({"consistency": "local", "optimizer": {"name": "nesterov", "lr": -0.7}}, "optimizer.lr"),
    ({"consistency": "local", "inner_optimizer": {"name": "adamw", "lr": -1.0}},
     "config.inner_optimizer.lr"),
    ({"compression": "powersgd", "powersgd_rank": 0}, "config.powersgd_rank"),
    ({"compression": "powersgd", "powersgd_rank": 65}, "config.powersgd_rank"),
    ({"compression": "lz4"}, "config.compression"),
])
def test_bad_settings_are_invalid_argument_naming_the_field(client, settings, field):
    with pytest.raises(gradserve.InvalidArgument) as refused:
        client.create_session(MATRIX, num_workers=2, **settings)
    assert refused.value.field == field
    assert client.create_session(MATRIX, num_workers=1)  # the server still answers


def test_local_steps_zero_on_the_wire_is_invalid_argument(stub):
    from gradserve.v1 import service_pb2
    from gradserve.requests import spec_message

    config = service_pb2.SessionConfig(model=spec_message(WIDE), consistency="local", local_steps=0)
    header = service_pb2.CreateSessionHeader(config=config)
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateSession(iter([service_pb2.CreateSessionRequest(header=header)]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.local_steps" in refused.value.details()
