"""Shared helpers for the engine tests: model specs and a PyTorch reference built from a spec."""

from __future__ import annotations

import numpy as np

from gradserve_services.engine import parse_spec
from gradserve_services.engine.masks import dropout_mask

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu")
LOSS_NAMES = ("softmax_cross_entropy", "binary_cross_entropy", "mse")


def mlp(sizes, activation="relu", loss="softmax_cross_entropy", **activation_attrs) -> dict:
    nodes, previous = [], "input"
    for index, units in enumerate(sizes[1:], start=1):
        nodes.append({"name": f"fc{index}", "op": "dense", "inputs": [previous], "units": units})
        previous = f"fc{index}"
        if index < len(sizes) - 1:
            nodes.append({"name": f"act{index}", "op": activation, "inputs": [previous], **activation_attrs})
            previous = f"act{index}"
    return {"input_features": sizes[0], "nodes": nodes, "output": previous, "loss": loss}


def one_op(op: str, loss="softmax_cross_entropy", features=5, width=4, outputs=3, **attrs) -> dict:
    """dense -> OP -> dense: the op sees a learnable input, so its backward rule is exercised."""
    return {
        "input_features": features,
        "nodes": [
            {"name": "fc1", "op": "dense", "inputs": ["input"], "units": width},
            {"name": "op", "op": op, "inputs": ["fc1"], **attrs},
            {"name": "head", "op": "dense", "inputs": ["op"], "units": outputs},
        ],
        "output": "head",
        "loss": loss,
    }


def residual_concat_dag(dropout_rate=None) -> dict:
    """A DAG with a residual add and a concat that reads one node three times (plus fan-out of fc1
    into four consumers). Listed out of order on purpose: the engine sorts it."""
    nodes = [
        {"name": "head", "op": "dense", "inputs": ["mix"], "units": 3},
        {"name": "fc1", "op": "dense", "inputs": ["input"], "units": 4},
        {"name": "act1", "op": "tanh", "inputs": ["fc1"]},
        {"name": "fc2", "op": "dense", "inputs": ["act1"], "units": 4},
        {"name": "res", "op": "add", "inputs": ["fc2", "fc1"]},
        {"name": "norm", "op": "layernorm", "inputs": ["res"]},
        {"name": "gate", "op": "sigmoid", "inputs": ["fc1"]},
        {"name": "cat", "op": "concat", "inputs": ["norm", "gate", "norm", "norm"]},
        {"name": "mix", "op": "gelu", "inputs": ["cat"]},
    ]
    if dropout_rate is not None:
        nodes[0]["inputs"] = ["drop"]
        nodes.append({"name": "drop", "op": "dropout", "inputs": ["mix"], "rate": dropout_rate})
    return {"input_features": 5, "nodes": nodes, "output": "head", "loss": "softmax_cross_entropy"}


def make_batch(spec, rows, dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    graph = parse_spec(spec)
    width = graph.widths[graph.output]
    x = rng.standard_normal((rows, graph.input_features)).astype(dtype)
    if graph.loss == "softmax_cross_entropy":
        y = rng.integers(0, width, size=rows)
    elif graph.loss == "binary_cross_entropy":
        y = rng.uniform(0, 1, size=(rows, width)).astype(dtype)
    else:
        y = rng.standard_normal((rows, width)).astype(dtype)
    return x, y


def random_params(model, dtype="float64", seed=0, scale=0.5):
    """Random values everywhere (biases and layernorm parameters too, unlike init_parameters)."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(shape) * scale + (1.0 if name.endswith(".weight") and len(shape) == 1 else 0.0)).astype(dtype)
        for name, shape in model.parameter_shapes().items()
    }


def torch_loss_and_grads(spec, params, x, y, *, train=False, seed=0, sample_offset=0):
    """The same graph in PyTorch autograd: (mean loss, {name: gradient as numpy})."""
    import torch
    import torch.nn.functional as F

    graph = parse_spec(spec)
    weights = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    values = {"input": torch.from_numpy(x)}
    for node in graph.nodes:
        inputs = [values[source] for source in node.inputs]
        values[node.name] = _torch_op(node, inputs, weights, train, seed, sample_offset, x.dtype, torch, F)
    out = values[graph.output]
    if graph.loss == "softmax_cross_entropy":
        loss = F.cross_entropy(out, torch.from_numpy(y))
    elif graph.loss == "binary_cross_entropy":
        loss = F.binary_cross_entropy_with_logits(out, torch.from_numpy(y))
    else:
        loss = F.mse_loss(out, torch.from_numpy(y))
    loss.backward()
    return float(loss.detach()), {name: w.grad.numpy() for name, w in weights.items()}


def _torch_op(node, inputs, weights, train, seed, sample_offset, dtype, torch, F):
    kind, attrs, name = node.op.kind, node.attrs, node.name
    if kind == "dense":
        out = inputs[0] @ weights[f"{name}.weight"]
        return out + weights[f"{name}.bias"] if attrs["bias"] else out
    if kind == "relu":
        return torch.relu(inputs[0])
    if kind == "leaky_relu":
        return F.leaky_relu(inputs[0], attrs["alpha"])
    if kind == "sigmoid":
        return torch.sigmoid(inputs[0])
    if kind == "tanh":
        return torch.tanh(inputs[0])
    if kind == "gelu":
        return F.gelu(inputs[0], approximate="tanh")
    if kind == "add":
        return sum(inputs[1:], inputs[0])
    if kind == "concat":
        return torch.cat(inputs, dim=1)
    if kind == "layernorm":
        width = inputs[0].shape[1]
        return F.layer_norm(inputs[0], (width,), weights[f"{name}.weight"], weights[f"{name}.bias"], attrs["eps"])
    if kind == "dropout":
        if not train or attrs["rate"] == 0:
            return inputs[0]
        shape = tuple(inputs[0].shape)
        mask = dropout_mask(np, seed, name, sample_offset, shape, attrs["rate"], dtype, np.empty(shape, dtype))
        return inputs[0] * torch.from_numpy(mask)
    raise AssertionError(f"no torch reference for {kind}")


def relative_error(actual, expected) -> float:
    """Norm-wise relative error (elementwise ratios blow up on entries that cancel to ~0)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def norms_close(actual, expected, rtol: float, atol: float = 1e-12) -> bool:
    """||actual - expected|| <= rtol ||expected|| + atol: a gradient that is exactly 0 in theory
    comes out of PyTorch as rounding noise (1e-17), which a purely relative test cannot accept."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return bool(np.linalg.norm(actual - expected) <= rtol * np.linalg.norm(expected) + atol)
