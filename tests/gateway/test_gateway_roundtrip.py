"""Every RPC through a real server: results equal the in-process engine/executor exactly."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import gradserve
from gradserve import GraphBuilder
from gradserve_services.engine import Model

from .conftest import SPEC, batch, initial_parameters


def test_compute_gradients_equal_the_engine_exactly(client, executor):
    params = initial_parameters()
    x, y = batch(rows=20)
    remote = client.compute_gradients(SPEC, params, x, y)
    local = executor.compute_gradients(SPEC, params, x, y)
    assert remote.loss == local["loss"] and remote.count == 20 and remote.jvp is None
    assert set(remote.gradients) == set(params)
    for name, gradient in local["grads"].items():
        assert remote.gradients[name].dtype == gradient.dtype
        np.testing.assert_array_equal(remote.gradients[name], gradient)
    engine_loss, engine_grads = Model(SPEC).loss_and_grad(params, x, y)
    for name, gradient in engine_grads.items():
        np.testing.assert_allclose(remote.gradients[name], gradient, rtol=1e-6, atol=1e-7)
    assert {"compute", "total"} <= set(remote.timings_ms)


def test_graph_with_fan_out_and_micro_batches_float64(client, executor):
    graph = GraphBuilder(5, loss="mse")
    hidden = graph.tanh(graph.dense("input", 7))
    output = graph.dense(graph.add(hidden, graph.gelu(graph.dense(hidden, 7))), 2)
    spec = graph.build(output)
    params = Model(spec).init_parameters(seed=3, dtype="float64")
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((9, 2))
    remote = client.compute_gradients(spec, params, x, y, micro_batch_size=4)
    local = executor.compute_gradients(spec, params, x, y, micro_batch_size=4)
    assert remote.loss == local["loss"]
    for name, gradient in local["grads"].items():
        assert remote.gradients[name].dtype == np.float64
        np.testing.assert_array_equal(remote.gradients[name], gradient)


def test_forward_mode_jvp(client, executor):
    params = initial_parameters()
    tangent = {name: np.ones_like(value) for name, value in params.items()}
    x, y = batch()
    remote = client.compute_gradients(SPEC, params, x, y, tangent=tangent)
    local = executor.compute_gradients(SPEC, params, x, y, tangent=tangent)
    assert remote.gradients is None and remote.jvp == local["jvp"]


def test_session_lifecycle_every_rpc(client, tmp_path):
    params = initial_parameters()
    session = client.create_session(SPEC, params, optimizer={"name": "adam", "lr": 0.01}, num_workers=2)
    version, pulled = client.pull_parameters(session)
    assert version == 0 and all(np.array_equal(pulled[k], params[k]) for k in params)

    x, y = batch()
    first = client.step(session, x, y)
    assert (first.step_id, first.version, first.duplicate, first.applied, first.samples) == (1, 1, False, True, 12)
    repeated = client.step(session, x, y, step_id=1)
    assert repeated.duplicate and not repeated.applied and repeated.version == 1 and repeated.loss == first.loss

    streamed = list(client.stream_steps(session, [batch(seed=s) for s in range(3)]))
    assert [r.step_id for r in streamed] == [2, 3, 4] and [r.version for r in streamed] == [2, 3, 4]

    saved = client.save_checkpoint(session)
    assert saved.version == 4
    _, at_save = client.pull_parameters(session)
    client.step(session, x, y)
    assert client.pull_parameters(session)[0] == 5
    restored = client.restore_checkpoint(session)
    assert restored == saved
    version, after_restore = client.pull_parameters(session)
    assert version == 4 and all(np.array_equal(after_restore[k], at_save[k]) for k in at_save)

    listed = {info.session_id: info for info in client.list_sessions()}
    assert listed[session].version == 4 and listed[session].consistency == "sync"
    assert client.close_session(session) == 4
    assert session not in {info.session_id for info in client.list_sessions()}


def test_session_from_seed_matches_engine_init(client):
    session = client.create_session(SPEC, seed=7, dtype="float64", num_workers=1)
    _, pulled = client.pull_parameters(session)
    expected = Model(SPEC).init_parameters(seed=7, dtype="float64")
    assert all(np.array_equal(pulled[k], expected[k]) for k in expected)
    client.close_session(session)


def test_step_matches_in_process_trainer(client, executor):
    """A sync step through gRPC gives exactly the parameters an in-process trainer gives."""
    from gradserve_services.cluster import TrainerConfig

    params = initial_parameters()
    optimizer = {"name": "momentum", "lr": 0.05}
    session = client.create_session(SPEC, params, optimizer=optimizer, num_workers=2)
    trainer = executor.create_trainer(TrainerConfig(SPEC, optimizer, num_workers=2), params)
    try:
        for step in range(1, 4):
            x, y = batch(seed=step)
            assert client.step(session, x, y).loss == trainer.step(step, x, y).loss
        _, remote = client.pull_parameters(session)
        _, local = trainer.parameters()
        for name in local:
            np.testing.assert_array_equal(remote[name], local[name])
    finally:
        trainer.close()
        client.close_session(session)


def test_health_and_reflection(gateway):
    with grpc.insecure_channel(gateway[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gradserve.v1.Gradserve"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert {"gradserve.v1.Gradserve", "grpc.health.v1.Health"} <= names


def test_sdk_exports_are_explicit():
    assert "Client" in gradserve.__all__ and "GradserveError" in gradserve.__all__
    for name in gradserve.__all__:
        assert hasattr(gradserve, name), name
    assert issubclass(gradserve.InvalidArgument, gradserve.GradserveError)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_labels_may_be_int32(client, executor, dtype):
    params = initial_parameters(dtype=dtype)
    x, y = batch()
    remote = client.compute_gradients(SPEC, params, x.astype(dtype), y.astype(np.int32))
    local = executor.compute_gradients(SPEC, params, x.astype(dtype), y.astype(np.int32))
    assert remote.loss == local["loss"]
