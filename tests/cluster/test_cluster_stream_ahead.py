"""StreamSteps through a real gRPC gateway over real Ray actors: a step whose successor has arrived
begins it before its own end (the gateway reads the stream one step ahead), and the session's
trajectory is bitwise the one of Step calls made one at a time (the calls between two streamed
steps: tests/gateway/test_gateway_steps_ahead.py)."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve import Client
from gradserve_services import metrics
from gradserve_services.cluster import RayExecutor
from gradserve_services.gateway import create_server

from .helpers import MLP_SPEC, batches

pytestmark = pytest.mark.integration

STEPS = 8


@pytest.fixture(scope="module")
def executor():
    started = RayExecutor(num_workers=2, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def client(executor):
    server, port = create_server(executor)
    try:
        with Client(f"127.0.0.1:{port}", timeout=180, retries=0) as client:
            yield client
    finally:
        server.stop(grace=5)


def _session(client) -> str:
    return client.create_session(MLP_SPEC, optimizer={"name": "momentum", "lr": 0.1}, seed=0,
                                 dtype="float64", num_workers=2)


def _begun_ahead() -> float:
    return metrics.REGISTRY.get_sample_value("gradserve_steps_begun_ahead_total")


def test_streamed_steps_begin_ahead_and_equal_steps_called_one_at_a_time(client):
    data = batches(STEPS, 40)
    one_at_a_time = _session(client)
    called = [client.step(one_at_a_time, x, y, step_id=index + 1) for index, (x, y) in enumerate(data)]
    streamed = _session(client)
    before = _begun_ahead()
    answered = list(client.stream_steps(streamed, iter(data)))
    assert _begun_ahead() > before, "no step of the stream was begun ahead"
    assert [r.loss for r in answered] == [r.loss for r in called]
    assert [r.version for r in answered] == list(range(1, STEPS + 1))
    assert not any(r.duplicate for r in answered)
    (version, expected), (streamed_version, pulled) = client.pull_parameters(one_at_a_time), \
        client.pull_parameters(streamed)
    assert version == streamed_version == STEPS
    for name, value in expected.items():
        np.testing.assert_array_equal(pulled[name], value, err_msg=name)
