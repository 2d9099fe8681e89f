"""Split learning: the service trains the body of a model, the client keeps the head and the labels.

Each step the service runs the body's forward on the batch (StepForward) and keeps its
activations; the client runs its head in numpy, takes the loss against its own labels, updates the
head, and sends back only dL/d(body output) (StepBackward), which the service pulls through the
held activations to update the body. Labels never leave the client. The chain of the two is the
gradient of the monolithic model (tests/gateway/test_gateway_split_learning.py checks it against
torch autograd). Run against a service:

    python examples/split_learning.py 127.0.0.1:50051
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np


def body_spec(input_features: int, hidden: int) -> dict:
    """The service's part: dense + relu. A spec names a loss; a two-phase step never uses it."""
    return {
        "input_features": input_features,
        "nodes": [{"name": "fc1", "op": "dense", "inputs": ["input"], "units": hidden},
                  {"name": "act1", "op": "relu", "inputs": ["fc1"]}],
        "output": "act1",
        "loss": "mse",
    }


@dataclass
class SoftmaxHead:
    """The client's part: logits = hidden @ weight + bias, mean softmax cross-entropy."""

    weight: np.ndarray  # (hidden, classes), the service's dense layout
    bias: np.ndarray  # (classes,)

    def loss_and_gradients(self, hidden: np.ndarray, labels: np.ndarray):
        """(mean loss, dL/d hidden, {"weight": dL/dW, "bias": dL/db})."""
        logits = hidden @ self.weight + self.bias
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(len(labels))
        d_logits = np.exp(log_probs)
        d_logits[rows, labels] -= 1
        d_logits /= len(labels)
        loss = float(-log_probs[rows, labels].mean())
        grads = {"weight": hidden.T @ d_logits, "bias": d_logits.sum(axis=0)}
        return loss, d_logits @ self.weight.T, grads

    def sgd(self, grads: dict, lr: float) -> None:
        self.weight -= lr * grads["weight"].astype(self.weight.dtype)
        self.bias -= lr * grads["bias"].astype(self.bias.dtype)


def split_step(client, session: str, head: SoftmaxHead, x: np.ndarray, labels: np.ndarray, lr: float,
               step_id: int | None = None):
    """One step of both halves; returns the service's StepResult (its `loss` is the head's)."""
    forward = client.step_forward(session, x, step_id=step_id)
    loss, d_hidden, head_grads = head.loss_and_gradients(forward.output, labels)
    result = client.step_backward(session, forward.step_id, d_hidden.astype(forward.output.dtype), loss)
    if result.applied and not result.duplicate:
        head.sgd(head_grads, lr)
    return result


def main(target: str) -> None:
    from gradserve import Client
    from gradserve_services.engine import Model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    labels = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    spec = body_spec(8, 32)
    head = SoftmaxHead(rng.standard_normal((32, 3)).astype(np.float32) * 0.1, np.zeros(3, np.float32))
    with Client(target) as client:
        session = client.create_session(spec, Model(spec).init_parameters(seed=0),
                                        optimizer={"name": "sgd", "lr": 0.5})
        for epoch in range(20):
            losses = [split_step(client, session, head, x[i:i + 32], labels[i:i + 32], lr=0.5).loss
                      for i in range(0, len(x), 32)]
        print(json.dumps({"epochs": epoch + 1, "train_loss": float(np.mean(losses))}))
        client.close_session(session)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")
