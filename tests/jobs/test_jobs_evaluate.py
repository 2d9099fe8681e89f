"""The job's evaluation runs through the Forward RPC of a real gRPC server at the session's
parameters, and its loss is the training loss's definition (the engine's, at pulled parameters)."""

from __future__ import annotations

import numpy as np
import pytest
from gradserve import Client, mlp
from gradserve_services.cluster import LocalExecutor
from gradserve_services.engine import Model
from gradserve_services.gateway import create_server
from gradserve_services.jobs.evaluate import EVAL_ROWS, Evaluator
from gradserve_services.metrics import REGISTRY


@pytest.fixture(scope="module")
def client():
    executor = LocalExecutor(num_workers=1)
    server, port = create_server(executor)
    with Client(f"127.0.0.1:{port}", timeout=60, retries=0) as client:
        yield client
    server.stop(grace=1)
    executor.shutdown()


def forwards_answered() -> float:
    return REGISTRY.get_sample_value("gradserve_rpc_requests_total", {"method": "Forward", "code": "OK"}) or 0.0


@pytest.mark.parametrize("task, loss", [("classification", "softmax_cross_entropy"), ("regression", "mse"),
                                        ("binary", "binary_cross_entropy")])
def test_evaluation_through_forward_is_the_engines_loss(client, task, loss):
    width = 1 if task == "binary" else 3
    spec = mlp(5, [8], width, loss=loss)
    rng = np.random.default_rng(0)
    rows = EVAL_ROWS + 37  # two Forward calls
    x = rng.standard_normal((rows, 5)).astype(np.float32)
    y = {"classification": lambda: rng.integers(0, 3, rows),
         "regression": lambda: rng.standard_normal((rows, 3)).astype(np.float32),
         "binary": lambda: rng.integers(0, 2, (rows, 1)).astype(np.float32)}[task]()
    session = client.create_session(spec, optimizer={"name": "sgd", "lr": 0.1})
    client.step(session, x[:64], y[:64])
    before = forwards_answered()
    result = Evaluator(spec, task).evaluate(lambda part: client.forward_session(session, part)[1], x, y)
    assert forwards_answered() - before == 2
    _, params = client.pull_parameters(session)
    model = Model(spec)
    expected = model.loss_and_grad_sum(params, x, y, train=False)
    assert result["loss"] == pytest.approx(expected.loss_sum / rows, rel=1e-5)
    out = model.forward(params, x)
    if task == "classification":
        assert result["accuracy"] == pytest.approx(float(np.mean(out.argmax(axis=1) == y)))
    if task == "binary":
        assert "auc" in result and 0.0 <= result["auc"] <= 1.0
    client.close_session(session)
