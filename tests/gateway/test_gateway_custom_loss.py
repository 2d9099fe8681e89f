"""Client-side losses through Forward + vector-Jacobian products over a real gRPC server: focal
loss and KL to soft targets equal torch autograd; split learning (a client numpy head over a
service-side body) gives the monolithic model's gradients."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradserve import mlp
from gradserve_services.engine import Model

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "custom_losses.py"
SPEC = mlp(8, [16], 4)
TOLERANCE = {"float32": 1e-6, "float64": 1e-10}


def example():
    loaded = importlib.util.spec_from_file_location("custom_losses", EXAMPLE)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def torch_reference(params, x, loss_of_logits):
    weights = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    hidden = torch.relu(torch.from_numpy(x) @ weights["fc1.weight"] + weights["fc1.bias"])
    logits = hidden @ weights["logits.weight"] + weights["logits.bias"]
    loss = loss_of_logits(logits)
    loss.backward()
    return float(loss.detach()), {name: w.grad.numpy() for name, w in weights.items()}


def relative(actual, expected):
    return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / max(np.linalg.norm(expected), 1e-30))


def check(client, dtype, numpy_loss, torch_loss, x):
    params = Model(SPEC).init_parameters(seed=3, dtype=dtype)
    assert set(params) == {"fc1.weight", "fc1.bias", "logits.weight", "logits.bias"}
    result = client.loss_gradients(SPEC, params, x, numpy_loss)
    expected_loss, expected = torch_reference(params, x, torch_loss)
    assert abs(result.loss - expected_loss) <= TOLERANCE[dtype] * abs(expected_loss)
    for name, grad in result.gradients.items():
        assert grad.dtype == np.dtype(dtype)
        assert relative(grad, expected[name]) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_focal_loss_equals_torch(client, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 8)).astype(dtype)
    labels = rng.integers(0, 4, size=24)

    def torch_focal(logits, gamma=2.0):
        log_p = F.log_softmax(logits, dim=1).gather(1, torch.from_numpy(labels)[:, None]).squeeze(1)
        return (-(1 - log_p.exp()) ** gamma * log_p).mean()

    check(client, dtype, example().focal_loss(labels), torch_focal, x)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kl_to_soft_targets_equals_torch(client, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((24, 8)).astype(dtype)
    targets = rng.dirichlet(np.ones(4), size=24).astype(dtype)

    def torch_kl(logits, temperature=2.0):
        log_q = F.log_softmax(logits / temperature, dim=1)
        return F.kl_div(log_q, torch.from_numpy(targets), reduction="batchmean")

    check(client, dtype, example().kl_to_soft_targets(targets, temperature=2.0), torch_kl, x)


def test_split_learning_equals_the_monolithic_model(client):
    """The service holds the body (dense + relu), the client a dense head with its labels; the
    chain of the two gives the gradients of the whole model trained in one piece."""
    whole = mlp(8, [16], 4)
    body = {"input_features": 8, "nodes": whole["nodes"][:2], "output": whole["nodes"][1]["name"],
            "loss": "mse"}
    params = Model(whole).init_parameters(seed=4, dtype="float64")
    body_params = {k: v for k, v in params.items() if k.startswith("fc1.")}
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 8))
    labels = np.arange(16) % 4

    hidden = client.forward(body, body_params, x)
    logits = hidden @ params["logits.weight"] + params["logits.bias"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    d_logits = probs.copy()
    d_logits[np.arange(16), labels] -= 1
    d_logits /= 16
    head_grads = {"logits.weight": hidden.T @ d_logits, "logits.bias": d_logits.sum(axis=0)}
    body_result = client.vjp(body, body_params, x, d_logits @ params["logits.weight"].T)

    reference = client.compute_gradients(whole, params, x, labels)
    for name, grad in {**body_result.gradients, **head_grads}.items():
        assert relative(grad, reference.gradients[name]) <= 1e-10, name
