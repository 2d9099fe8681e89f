"""Split learning and client-side losses training sessions over a real gRPC server, checked
against torch autograd: a numpy head over a service-side body gives the monolithic model's
gradients (1e-6 float32, 1e-10 float64) and, step by step, its SGD training; train_step with a
focal loss or KL to soft targets makes the update torch's optimizer makes with that loss."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradserve import mlp
from gradserve_services.engine import Model

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
TOLERANCE = {"float32": 1e-6, "float64": 1e-10}
HIDDEN, CLASSES, FEATURES = 16, 4, 8


def load(name: str):
    loaded = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def relative(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def torch_monolithic(params, x, labels):
    """Loss and gradients of the whole model (dense, relu, dense, mean softmax CE) by autograd."""
    weights = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    hidden = torch.relu(torch.from_numpy(x) @ weights["fc1.weight"] + weights["fc1.bias"])
    logits = hidden @ weights["logits.weight"] + weights["logits.bias"]
    loss = F.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    return float(loss.detach()), {name: w.grad.numpy() for name, w in weights.items()}


def data(dtype, rows=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, FEATURES)).astype(dtype), rng.integers(0, CLASSES, rows)


def whole_parameters(dtype):
    return Model(mlp(FEATURES, [HIDDEN], CLASSES)).init_parameters(seed=4, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_head_over_body_gives_the_monolithic_gradients(client, dtype):
    split = load("split_learning")
    params = whole_parameters(dtype)
    body = {k: v for k, v in params.items() if k.startswith("fc1.")}
    x, labels = data(dtype)
    head = split.SoftmaxHead(params["logits.weight"].copy(), params["logits.bias"].copy())
    spec = split.body_spec(FEATURES, HIDDEN)
    hidden = client.forward(spec, body, x)
    loss, d_hidden, head_grads = head.loss_and_gradients(hidden, labels)
    body_grads = client.vjp(spec, body, x, d_hidden.astype(dtype)).gradients
    expected_loss, expected = torch_monolithic(params, x, labels)
    assert abs(loss - expected_loss) <= TOLERANCE[dtype] * abs(expected_loss)
    got = {**body_grads, "logits.weight": head_grads["weight"], "logits.bias": head_grads["bias"]}
    for name in expected:
        assert relative(got[name], expected[name]) <= TOLERANCE[dtype], name


def test_split_training_steps_are_the_monolithic_models_sgd_steps(client):
    """Three steps: the service's body (two-phase steps) and the client's head, both plain SGD,
    move exactly as torch's SGD moves the whole model (float64, each update to 1e-10)."""
    split = load("split_learning")
    params = whole_parameters("float64")
    lr = 0.3
    session = client.create_session(split.body_spec(FEATURES, HIDDEN),
                                    {k: v for k, v in params.items() if k.startswith("fc1.")},
                                    optimizer={"name": "sgd", "lr": lr})
    head = split.SoftmaxHead(params["logits.weight"].copy(), params["logits.bias"].copy())
    reference = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    optimizer = torch.optim.SGD(reference.values(), lr=lr)
    for step in range(3):
        x, labels = data("float64", seed=10 + step)
        before = {name: w.detach().numpy().copy() for name, w in reference.items()}
        optimizer.zero_grad()
        hidden = torch.relu(torch.from_numpy(x) @ reference["fc1.weight"] + reference["fc1.bias"])
        F.cross_entropy(hidden @ reference["logits.weight"] + reference["logits.bias"],
                        torch.from_numpy(labels)).backward()
        optimizer.step()
        result = split.split_step(client, session, head, x, labels, lr)
        assert result.applied and result.version == step + 1
        _, body = client.pull_parameters(session)
        got = {**body, "logits.weight": head.weight, "logits.bias": head.bias}
        for name, w in reference.items():
            update, expected_update = got[name] - before[name], w.detach().numpy() - before[name]
            assert relative(update, expected_update) <= 1e-10, (step, name)
            np.testing.assert_allclose(got[name], w.detach().numpy(), rtol=1e-12, atol=1e-14)
    client.close_session(session)


def torch_focal(labels, gamma=2.0):
    def loss(logits):
        log_p = F.log_softmax(logits, dim=1).gather(1, torch.from_numpy(labels)[:, None]).squeeze(1)
        return (-(1 - log_p.exp()) ** gamma * log_p).mean()
    return loss


def torch_kl(targets, temperature=2.0):
    def loss(logits):
        return F.kl_div(F.log_softmax(logits / temperature, dim=1), torch.from_numpy(targets),
                        reduction="batchmean")
    return loss


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("which", ["focal", "kl"])
def test_train_step_with_a_client_loss_makes_torchs_update(client, dtype, which):
    custom = load("custom_losses")
    spec = mlp(FEATURES, [HIDDEN], CLASSES)
    params = whole_parameters(dtype)
    x, labels = data(dtype, seed=3)
    if which == "focal":
        numpy_loss, reference_loss = custom.focal_loss(labels), torch_focal(labels)
    else:
        targets = np.random.default_rng(5).dirichlet(np.ones(CLASSES), size=len(x)).astype(dtype)
        numpy_loss, reference_loss = custom.kl_to_soft_targets(targets, temperature=2.0), torch_kl(targets)
    lr = 0.5
    session = client.create_session(spec, params, optimizer={"name": "sgd", "lr": lr})
    result = client.train_step(session, x, numpy_loss)
    _, trained = client.pull_parameters(session)
    client.close_session(session)

    weights = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    hidden = torch.relu(torch.from_numpy(x) @ weights["fc1.weight"] + weights["fc1.bias"])
    loss = reference_loss(hidden @ weights["logits.weight"] + weights["logits.bias"])
    loss.backward()
    assert abs(result.loss - float(loss.detach())) <= TOLERANCE[dtype] * abs(float(loss.detach()))
    for name, w in weights.items():
        # The update the session applied is -lr times its gradient: compare that gradient. In
        # float32 it is recovered from a difference of parameters, which keeps about 7 digits of
        # the parameter, not of the update (the gradient itself is checked to 1e-6 by
        # test_gateway_custom_loss); in float64 to 1e-10.
        applied_gradient = (params[name].astype(np.float64) - trained[name]) / lr
        assert relative(applied_gradient, w.grad.numpy()) <= (1e-4 if dtype == "float32" else 1e-10), name


def test_two_sessions_chained_train_as_one_model(client):
    """Model A's output feeds model B (two sessions: two services in general). B's backward hands
    back dL/d(its input) through its held forward, which is A's output gradient: both take torch's
    SGD step of the composed model (float64, each parameter to 1e-10)."""
    first = {"input_features": FEATURES, "nodes": [{"name": "a", "op": "dense", "inputs": ["input"], "units": 6},
                                                   {"name": "a_act", "op": "tanh", "inputs": ["a"]}],
             "output": "a_act", "loss": "mse"}
    second = mlp(6, [5], CLASSES)
    params_a = Model(first).init_parameters(seed=1, dtype="float64")
    params_b = Model(second).init_parameters(seed=2, dtype="float64")
    lr = 0.2
    session_a = client.create_session(first, params_a, optimizer={"name": "sgd", "lr": lr})
    session_b = client.create_session(second, params_b, optimizer={"name": "sgd", "lr": lr})
    weights = {name: torch.tensor(value, requires_grad=True) for name, value in {**params_a, **params_b}.items()}
    optimizer = torch.optim.SGD(weights.values(), lr=lr)
    loss_of = load("custom_losses").focal_loss
    for step in range(3):
        x, labels = data("float64", seed=20 + step)
        hidden = client.step_forward(session_a, x, step_id=step + 1)
        out = client.step_forward(session_b, hidden.output, step_id=step + 1)
        value, d_out = loss_of(labels)(out.output)
        b_result = client.step_backward(session_b, step + 1, d_out, value, input_gradient=True)
        a_result = client.step_backward(session_a, step + 1, b_result.input_gradient, value)
        assert b_result.applied and a_result.applied and a_result.input_gradient is None

        optimizer.zero_grad()
        h = torch.tanh(torch.from_numpy(x) @ weights["a.weight"] + weights["a.bias"])
        h = torch.relu(h @ weights["fc1.weight"] + weights["fc1.bias"])
        torch_focal(labels)(h @ weights["logits.weight"] + weights["logits.bias"]).backward()
        optimizer.step()
    repeat = client.step_backward(session_b, 3, d_out, value, input_gradient=True)
    assert repeat.duplicate and repeat.input_gradient is None  # a repeat's answer carries no tensors
    (_, got_a), (_, got_b) = client.pull_parameters(session_a), client.pull_parameters(session_b)
    for name, value in {**got_a, **got_b}.items():
        np.testing.assert_allclose(value, weights[name].detach().numpy(), rtol=1e-10, atol=1e-13)
    client.close_session(session_a)
    client.close_session(session_b)


@pytest.mark.parametrize("example", ["split_learning", "custom_losses"])
def test_the_examples_run_against_a_service_and_learn(gateway, capsys, example):
    load(example).main(gateway[1])
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    if example == "split_learning":  # 20 epochs of the split model on a learnable 3-class rule
        assert last["train_loss"] < 0.5
    else:  # 20 two-phase steps on the focal loss
        assert last["focal_loss_after_20_steps"] < 0.6 * last["focal_loss_first_step"]
