"""Through a real gRPC gateway over real Ray actors: updates that would make parameters non-finite
are refused (FAILED_PRECONDITION naming the cause) and change nothing, the session going on from its
last good version; the exactly-once window answers retries inside it, refuses ids older than it, and
holds across SaveCheckpoint / RestoreCheckpoint. A streamed step whose successor has arrived begins it
before its own end, and the trajectory is bitwise the one of Step calls made one at a time (the calls
between two streamed steps: tests/gateway/test_gateway_steps_ahead.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import gradserve
from gradserve import Client
from gradserve_services import metrics
from gradserve_services.checkpoint import load_checkpoint
from gradserve_services.cluster import LocalExecutor, RayExecutor, TrainerConfig
from gradserve_services.engine import Model
from gradserve_services.gateway import create_server
from gradserve_services.gateway.sessions import SessionLimits

from .helpers import MLP_SPEC, batches, classification_data

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW = 8
LARGEST = float(np.finfo(np.float64).max)
STREAMED_STEPS = 8
MSE_SPEC = {"input_features": 4, "nodes": [{"name": "out", "op": "dense", "inputs": ["input"], "units": 2}],
            "output": "out", "loss": "mse"}


@pytest.fixture(scope="module")
def executor():
    started = RayExecutor(num_workers=2, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def gateway(executor, tmp_path_factory):
    checkpoints = str(tmp_path_factory.mktemp("checkpoints"))
    server, port = create_server(executor, checkpoint_dir=checkpoints,
                                 limits=SessionLimits(step_window=WINDOW))
    yield f"127.0.0.1:{port}", checkpoints
    server.stop(grace=5)


@pytest.fixture(scope="module")
def client(gateway):
    with Client(gateway[0], timeout=180, retries=0) as client:
        yield client


def _assert_same(pulled, expected):
    assert set(pulled) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(pulled[name], value, err_msg=name)


def test_a_learning_rate_beyond_float32_is_refused_at_creation(client):
    sessions = len(client.list_sessions())
    with pytest.raises(gradserve.InvalidArgument) as refused:
        client.create_session(MLP_SPEC, optimizer={"name": "sgd", "lr": 1e308}, dtype="float32")
    assert refused.value.field == "optimizer.lr"
    assert len(client.list_sessions()) == sessions  # nothing was created, the server answers


def test_an_update_overflowing_on_one_server_shard_is_refused_on_all(client):
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    params["logits.bias"][:] = LARGEST  # lr 1e300 pushes the target class's bias past the largest
    session = client.create_session(MLP_SPEC, params, optimizer={"name": "sgd", "lr": 1e300},
                                    num_workers=2, ps_shards=2)
    try:
        x, y = classification_data(24)
        for attempt in range(2):  # refused again, never half applied
            with pytest.raises(gradserve.FailedPrecondition) as refused:
                client.step(session, x, y, step_id=1 + attempt)
            assert refused.value.field == "parameters.logits.bias"
            assert "non-finite" in refused.value.message
            version, pulled = client.pull_parameters(session)
            assert version == 0
            _assert_same(pulled, params)
    finally:
        client.close_session(session)


def test_a_loss_overflowing_on_a_batch_is_refused_and_training_goes_on_undisturbed(client):
    params = Model(MSE_SPEC).init_parameters(seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    good = [(rng.standard_normal((16, 4)), rng.standard_normal((16, 2))) for _ in range(2)]
    optimizer = {"name": "adam", "lr": 1e-2}
    session = client.create_session(MSE_SPEC, params, optimizer=optimizer, num_workers=2)
    try:
        assert client.step(session, *good[0], step_id=1).version == 1
        with pytest.raises(gradserve.FailedPrecondition) as refused:
            client.step(session, np.full((16, 4), 1e200), np.zeros((16, 2)), step_id=2)
        assert refused.value.field == "loss" and "not finite" in refused.value.message
        assert client.pull_parameters(session)[0] == 1
        result = client.step(session, *good[1], step_id=3)
        assert result.version == 2 and np.isfinite(result.loss)
        _, pulled = client.pull_parameters(session)
    finally:
        client.close_session(session)
    with LocalExecutor(num_workers=2) as local:  # the same two steps, never disturbed
        trainer = local.create_trainer(TrainerConfig(MSE_SPEC, optimizer, num_workers=2), params)
        trainer.step(1, *good[0])
        trainer.step(3, *good[1])
        for name, value in trainer.parameters()[1].items():
            np.testing.assert_allclose(pulled[name], value, rtol=1e-12, atol=0, err_msg=name)


def test_step_window_edge_and_checkpoint_restore(client, gateway):
    data = [classification_data(12, seed) for seed in range(16)]
    session = client.create_session(MLP_SPEC, optimizer={"name": "momentum", "lr": 0.1},
                                    dtype="float64", num_workers=2)
    try:
        first = {r.step_id: r for r in client.stream_steps(
            session, [(step, *data[step]) for step in range(1, 13)])}
        assert first[12].version == 12

        oldest = 12 - WINDOW + 1
        again = client.step(session, *data[0], step_id=oldest)
        assert again.duplicate and (again.loss, again.version) == (first[oldest].loss, first[oldest].version)
        version, before = client.pull_parameters(session)
        with pytest.raises(gradserve.FailedPrecondition) as refused:
            client.step(session, *data[oldest - 1], step_id=oldest - 1)
        assert refused.value.field == "step_id"
        assert f"step_id {oldest - 1} is older than the retained window" in refused.value.message
        assert client.pull_parameters(session)[0] == version == 12
        _assert_same(client.pull_parameters(session)[1], before)

        saved = client.save_checkpoint(session)
        _, meta = load_checkpoint(os.path.join(gateway[1], session, saved.name))
        assert meta["step_mark"] == 12 and sorted(map(int, meta["step_log"])) == list(range(oldest, 13))

        later = client.step(session, *data[13], step_id=13)
        assert later.version == 13
        restored = client.restore_checkpoint(session, saved.name)
        assert restored.version == 12
        assert client.step(session, *data[0], step_id=oldest).duplicate
        with pytest.raises(gradserve.FailedPrecondition):
            client.step(session, *data[oldest - 1], step_id=oldest - 1)
        replayed = client.step(session, *data[13], step_id=13)  # not in the checkpoint: new again
        assert not replayed.duplicate and replayed.version == 13 and replayed.loss == later.loss
    finally:
        client.close_session(session)


def _streaming_session(client) -> str:
    return client.create_session(MLP_SPEC, optimizer={"name": "momentum", "lr": 0.1}, seed=0,
                                 dtype="float64", num_workers=2)


def _begun_ahead() -> float:
    return metrics.REGISTRY.get_sample_value("gradserve_steps_begun_ahead_total")


def test_streamed_steps_begin_ahead_and_equal_steps_called_one_at_a_time(client):
    data = batches(STREAMED_STEPS, 40)
    one_at_a_time = _streaming_session(client)
    called = [client.step(one_at_a_time, x, y, step_id=index + 1) for index, (x, y) in enumerate(data)]
    streamed = _streaming_session(client)
    try:
        before = _begun_ahead()
        answered = list(client.stream_steps(streamed, iter(data)))
        assert _begun_ahead() > before, "no step of the stream was begun ahead"
        assert [r.loss for r in answered] == [r.loss for r in called]
        assert [r.version for r in answered] == list(range(1, STREAMED_STEPS + 1))
        assert not any(r.duplicate for r in answered)
        (version, expected), (streamed_version, pulled) = client.pull_parameters(one_at_a_time), \
            client.pull_parameters(streamed)
        assert version == streamed_version == STREAMED_STEPS
        _assert_same(pulled, expected)
    finally:
        client.close_session(one_at_a_time)
        client.close_session(streamed)
