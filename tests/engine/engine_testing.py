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


def dlrm_spec(dense_features=3, dim=4, shared_table=False, loss="binary_cross_entropy") -> dict:
    """DLRM-shaped: a bottom MLP on the dense features, lookups of every kind, the pairwise dot
    interaction, a top MLP. Categorical ids (2 fields, a table each, or one shared table), a
    weighted bag summed and a plain bag averaged; tables of different sizes."""
    lookups = [
        {"name": "bag_sum", "op": "embedding_bag", "inputs": ["tags"], "rows": 6, "dim": dim},
        {"name": "bag_mean", "op": "embedding_bag", "inputs": ["items"], "rows": 9, "dim": dim, "mode": "mean"},
    ]
    if shared_table:
        lookups.insert(0, {"name": "emb", "op": "embedding", "inputs": ["cats"], "rows": 7, "dim": dim})
    else:
        lookups[:0] = [
            {"name": "emb0", "op": "embedding", "inputs": ["cats"], "rows": 7, "dim": dim, "field": 0},
            {"name": "emb1", "op": "embedding", "inputs": ["cats"], "rows": 5, "dim": dim, "field": 1},
        ]
    nodes = [
        {"name": "bot1", "op": "dense", "inputs": ["dense"], "units": 8},
        {"name": "bot1_act", "op": "relu", "inputs": ["bot1"]},
        {"name": "bot2", "op": "dense", "inputs": ["bot1_act"], "units": dim},
        {"name": "bot2_act", "op": "tanh", "inputs": ["bot2"]},
        *lookups,
        {"name": "inter", "op": "dot_interaction", "inputs": ["bot2_act", *(n["name"] for n in lookups)], "dim": dim},
        {"name": "top1", "op": "dense", "inputs": ["inter"], "units": 6},
        {"name": "top1_act", "op": "relu", "inputs": ["top1"]},
        {"name": "top2", "op": "dense", "inputs": ["top1_act"], "units": 1},
    ]
    inputs = [
        {"name": "dense", "kind": "float", "features": dense_features},
        {"name": "cats", "kind": "ids", "fields": 2},
        {"name": "tags", "kind": "bag", "weighted": True},
        {"name": "items", "kind": "bag"},
    ]
    return {"inputs": inputs, "nodes": nodes, "output": "top2", "loss": loss}


def lookup_spec(op: str, source: dict, loss="mse", outputs=2, **attrs) -> dict:
    """INPUT -> OP -> dense head: one lookup op on one declared input (ids or bag)."""
    return {
        "inputs": [source],
        "nodes": [
            {"name": "lookup", "op": op, "inputs": [source["name"]], **attrs},
            {"name": "head", "op": "dense", "inputs": ["lookup"], "units": outputs},
        ],
        "output": "head",
        "loss": loss,
    }


def id_bounds(graph) -> dict:
    """For every ids input the rows of the smallest table each column reaches; for a bag, overall."""
    bounds = {}
    for node in graph.nodes:
        if node.op.kind not in ("embedding", "embedding_bag"):
            continue
        decl = graph.inputs[node.inputs[0]]
        rows = node.attrs["rows"]
        if decl.kind == "ids":
            columns = bounds.setdefault(decl.name, [None] * decl.width)
            field = node.attrs["field"]
            for column in range(decl.width) if field is None else [field]:
                columns[column] = rows if columns[column] is None else min(columns[column], rows)
        else:
            bounds[decl.name] = min(bounds.get(decl.name, rows), rows)
    return bounds


def spread_ids(rng, count, bound):
    """Ids in [0, bound) that include both ends and repeat (count >= 3)."""
    ids = rng.integers(0, bound, size=count)
    ids[:3] = [0, bound - 1, 0]
    return rng.permutation(ids)


def make_named_batch(spec, rows, dtype="float64", seed=0, max_bag=4):
    """Tensors for every declared input (ids at the tables' ends, repeated ids, empty bags) and
    targets for the loss."""
    rng = np.random.default_rng(seed)
    graph = parse_spec(spec)
    bounds = id_bounds(graph)
    tensors = {}
    for decl in graph.inputs.values():
        if decl.kind == "float":
            tensors[decl.name] = rng.standard_normal((rows, decl.width)).astype(dtype)
        elif decl.kind == "ids":
            columns = [spread_ids(rng, rows, bound or 1) for bound in bounds[decl.name]]
            tensors[decl.name] = np.stack(columns, axis=1).astype(np.int64)
        else:
            lengths = rng.integers(0, max_bag + 1, size=rows)
            lengths[: min(2, rows)] = [0, max_bag][: min(2, rows)]  # an empty bag and a full one
            lengths = rng.permutation(lengths)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            tensors[f"{decl.name}.values"] = spread_ids(rng, max(int(lengths.sum()), 3), bounds[decl.name])[
                : int(lengths.sum())
            ].astype(np.int64)
            tensors[f"{decl.name}.offsets"] = offsets
            if decl.weighted:
                tensors[f"{decl.name}.weights"] = rng.uniform(-1.5, 1.5, size=int(lengths.sum())).astype(dtype)
    width = graph.widths[graph.output]
    if graph.loss == "softmax_cross_entropy":
        y = rng.integers(0, width, size=rows)
    elif graph.loss == "binary_cross_entropy":
        y = (rng.uniform(0, 1, size=(rows, width)) < 0.4).astype(dtype)
    else:
        y = rng.standard_normal((rows, width)).astype(dtype)
    return tensors, y


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
    values = torch_inputs(graph, x, torch)
    dtype = next(iter(params.values())).dtype
    for node in graph.nodes:
        inputs = [values[source] for source in node.inputs]
        values[node.name] = _torch_op(node, inputs, weights, train, seed, sample_offset, dtype, torch, F)
    out = values[graph.output]
    if graph.loss == "softmax_cross_entropy":
        loss = F.cross_entropy(out, torch.from_numpy(y))
    elif graph.loss == "binary_cross_entropy":
        loss = F.binary_cross_entropy_with_logits(out, torch.from_numpy(y))
    else:
        loss = F.mse_loss(out, torch.from_numpy(y))
    loss.backward()
    return float(loss.detach()), {name: w.grad.numpy() for name, w in weights.items()}


def torch_inputs(graph, x, torch) -> dict:
    """The batch as torch values by input name: tensors, and (values, offsets, weights) per bag."""
    if "input" in graph.inputs:
        return {"input": torch.from_numpy(x)}
    values = {}
    for decl in graph.inputs.values():
        if decl.kind == "bag":
            weights = x.get(f"{decl.name}.weights")
            values[decl.name] = (
                torch.from_numpy(x[f"{decl.name}.values"]),
                torch.from_numpy(x[f"{decl.name}.offsets"]),
                None if weights is None else torch.from_numpy(weights),
            )
        else:
            values[decl.name] = torch.from_numpy(x[decl.name])
    return values


def torch_dot_interaction(inputs, dim, self_interaction, concat_first, torch):
    """DLRM's `interact_features` (facebookresearch/dlrm, dlrm_s_pytorch.py), "dot" branch."""
    batch = inputs[0].shape[0]
    vectors = torch.cat([x.reshape(batch, -1, dim) for x in inputs], dim=1)
    gram = torch.bmm(vectors, torch.transpose(vectors, 1, 2))
    count = vectors.shape[1]
    offset = 1 if self_interaction else 0
    li = torch.tensor([i for i in range(count) for j in range(i + offset)], dtype=torch.long)
    lj = torch.tensor([j for i in range(count) for j in range(i + offset)], dtype=torch.long)
    pairs = gram[:, li, lj]
    return torch.cat([inputs[0], pairs], dim=1) if concat_first else pairs


def _torch_op(node, inputs, weights, train, seed, sample_offset, dtype, torch, F):
    kind, attrs, name = node.op.kind, node.attrs, node.name
    if kind == "embedding":
        ids = inputs[0] if attrs["field"] is None else inputs[0][:, attrs["field"]]
        return F.embedding(ids, weights[f"{name}.weight"]).reshape(inputs[0].shape[0], -1)
    if kind == "embedding_bag":
        values, offsets, per_sample_weights = inputs[0]
        return F.embedding_bag(values, weights[f"{name}.weight"], offsets, mode=attrs["mode"],
                               per_sample_weights=per_sample_weights)
    if kind == "dot_interaction":
        dim = attrs["dim"] or inputs[0].shape[1]
        return torch_dot_interaction(inputs, dim, attrs["self_interaction"], attrs["concat_first"], torch)
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
