"""Losses the service does not know, computed in numpy on the client: each returns (mean loss,
dL/d logits) for `Client.loss_gradients` (stateless) or `Client.train_step` (a session trains on
it: two-phase steps), and the service differentiates the model through the output gradient (a
vector-Jacobian product). Run against a service:

    python examples/custom_losses.py 127.0.0.1:50051
"""

from __future__ import annotations

import json
import sys

import numpy as np


def _softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True), shifted - np.log(exp.sum(axis=1, keepdims=True))


def focal_loss(labels, gamma: float = 2.0):
    """Lin et al. 2017: mean over rows of -(1 - p_t)^gamma log p_t, p_t the softmax of the true class."""
    def loss(logits):
        probs, log_probs = _softmax(logits)
        rows = np.arange(logits.shape[0])
        p_t, log_p_t = probs[rows, labels], log_probs[rows, labels]
        weight = (1 - p_t) ** gamma
        value = -(weight * log_p_t).mean()
        # d/dp_t of -(1-p)^g log p = g (1-p)^(g-1) log p - (1-p)^g / p; dp_t/dz = p_t (onehot - p).
        d_p_t = gamma * (1 - p_t) ** (gamma - 1) * log_p_t - weight / p_t
        onehot = np.zeros_like(logits)
        onehot[rows, labels] = 1
        grad = (d_p_t * p_t)[:, None] * (onehot - probs) / logits.shape[0]
        return value, grad
    return loss


def kl_to_soft_targets(targets, temperature: float = 1.0):
    """Distillation: mean over rows of KL(targets || softmax(logits / T))."""
    def loss(logits):
        probs, log_probs = _softmax(logits / temperature)
        safe = np.where(targets > 0, targets, 1)
        value = (targets * (np.log(safe) - log_probs)).sum(axis=1).mean()
        grad = (probs - targets) / (temperature * logits.shape[0])
        return value, grad
    return loss


def main(target: str) -> None:
    from gradserve import Client, mlp
    from gradserve_services.engine import Model

    spec = mlp(8, [16], 4)
    params = Model(spec).init_parameters(seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    labels = rng.integers(0, 4, size=32)
    with Client(target) as client:
        result = client.loss_gradients(spec, params, x, focal_loss(labels))
        print(json.dumps({"focal_loss": result.loss, "gradient_norm": float(np.sqrt(sum((g ** 2).sum() for g in result.gradients.values())))}))
        session = client.create_session(spec, params, optimizer={"name": "adam", "lr": 0.01})
        losses = [client.train_step(session, x, focal_loss(labels)).loss for _ in range(20)]
        print(json.dumps({"focal_loss_first_step": losses[0], "focal_loss_after_20_steps": losses[-1]}))
        client.close_session(session)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")
