"""PyTorch interop: a `torch.nn.Sequential` (or a state_dict + spec) <-> an engine spec + parameters.

torch is optional for gradserve, so it is imported inside the functions that need it; importing
this module (or `gradserve`, which never imports it) costs nothing without torch installed.

Node names are the Sequential's own module names ("0", "1", ... or the keys of an OrderedDict), so
the engine's parameter names (`NODE.weight`, `NODE.bias`) are exactly torch's state_dict keys. The
one layout difference: torch's `Linear.weight` is `(out, in)`, the engine's dense weight is
`(in, units)`; every crossing transposes it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from gradserve_services.errors import InvalidArgument

__all__ = ["spec_from_sequential", "params_from_state_dict", "to_state_dict", "to_sequential"]

CHAIN_OPS = ("dense", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "layernorm", "dropout")


def spec_from_sequential(
    sequential, *, input_features: int | None = None, loss: str = "softmax_cross_entropy", dtype="float32"
) -> tuple[dict, dict[str, np.ndarray]]:
    """The spec and parameters of `sequential`; `input_features` defaults to the first Linear's."""
    import torch

    if not isinstance(sequential, torch.nn.Sequential):
        raise InvalidArgument(f"expected torch.nn.Sequential, got {type(sequential).__name__}", field="module")
    nodes, previous = [], "input"
    for name, module in sequential.named_children():
        node = _node_for_module(name, module)
        node["inputs"] = [previous]
        nodes.append(node)
        previous = name
        if input_features is None and node["op"] == "dense":
            input_features = module.in_features
    if not nodes:
        raise InvalidArgument("the Sequential is empty", field="module")
    if input_features is None:
        raise InvalidArgument("no Linear layer to take the input width from; pass input_features", field="module")
    spec = {"input_features": int(input_features), "nodes": nodes, "output": previous, "loss": loss}
    return spec, params_from_state_dict(sequential.state_dict(), spec, dtype=dtype)


def _node_for_module(name: str, module) -> dict:
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return {"name": name, "op": "dense", "units": module.out_features, "bias": module.bias is not None}
    if isinstance(module, nn.ReLU):
        return {"name": name, "op": "relu"}
    if isinstance(module, nn.LeakyReLU):
        return {"name": name, "op": "leaky_relu", "alpha": float(module.negative_slope)}
    if isinstance(module, nn.Sigmoid):
        return {"name": name, "op": "sigmoid"}
    if isinstance(module, nn.Tanh):
        return {"name": name, "op": "tanh"}
    if isinstance(module, nn.GELU):
        if module.approximate != "tanh":
            raise InvalidArgument("the engine's gelu is the tanh approximation: use GELU(approximate='tanh')",
                                  field=name)
        return {"name": name, "op": "gelu"}
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise InvalidArgument("only LayerNorm over the last (feature) axis is supported", field=name)
        if module.elementwise_affine and module.bias is None:
            raise InvalidArgument("LayerNorm(bias=False) is not supported", field=name)
        return {"name": name, "op": "layernorm", "eps": float(module.eps)}
    if isinstance(module, nn.Dropout):
        return {"name": name, "op": "dropout", "rate": float(module.p)}
    raise InvalidArgument(
        f"unsupported module {type(module).__name__}; supported: Linear, ReLU, LeakyReLU, Sigmoid, Tanh, "
        "GELU(approximate='tanh'), LayerNorm, Dropout",
        field=name,
    )


def params_from_state_dict(state_dict, spec: dict, *, dtype="float32") -> dict[str, np.ndarray]:
    """Engine parameters for `spec` from a torch state_dict keyed like the spec's node names."""
    from gradserve_services.engine import Model

    ops = {node["name"]: node["op"] for node in spec["nodes"]}
    params = {}
    for name, shape in Model(spec).parameter_shapes().items():
        node, _, kind = name.rpartition(".")
        if name in state_dict:
            value = state_dict[name].detach().cpu().numpy()
        elif ops[node] == "layernorm":  # LayerNorm(elementwise_affine=False): identity scale and shift
            value = np.ones(shape) if kind == "weight" else np.zeros(shape)
        else:
            raise InvalidArgument(f"the state_dict has no {name!r}", field=name)
        if ops[node] == "dense" and kind == "weight":
            value = value.T  # torch (out, in) -> engine (in, units)
        if tuple(value.shape) != tuple(shape):
            raise InvalidArgument(f"shape {tuple(value.shape)} does not fit the spec's {tuple(shape)}", field=name)
        params[name] = np.ascontiguousarray(value, dtype=dtype)
    return params


def to_state_dict(spec: dict, params: dict) -> "OrderedDict[str, object]":
    """A torch state_dict (float tensors) holding `params`, dense weights transposed to (out, in)."""
    import torch

    ops = {node["name"]: node["op"] for node in spec["nodes"]}
    state = OrderedDict()
    for name, value in params.items():
        node, _, kind = name.rpartition(".")
        array = np.asarray(value)
        if ops.get(node) == "dense" and kind == "weight":
            array = array.T
        state[name] = torch.from_numpy(np.ascontiguousarray(array))
    return state


def to_sequential(spec: dict, params: dict):
    """A `torch.nn.Sequential` computing the same function; the spec must be a chain of the
    supported ops (no add/concat: a Sequential cannot express fan-out)."""
    import torch
    import torch.nn as nn

    from gradserve_services.engine.spec import INPUT, parse_spec

    graph = parse_spec(spec)
    modules, widths, previous = OrderedDict(), graph.widths, INPUT
    for node in graph.nodes:
        if node.op.kind not in CHAIN_OPS or node.inputs != (previous,):
            raise InvalidArgument(f"op {node.op.kind!r} with inputs {list(node.inputs)} is not a Sequential chain",
                                  field=node.name)
        attrs, width_in = node.attrs, widths[previous]
        if node.op.kind == "dense":
            module = nn.Linear(width_in, attrs["units"], bias=attrs.get("bias", True))
        elif node.op.kind == "leaky_relu":
            module = nn.LeakyReLU(attrs["alpha"])
        elif node.op.kind == "gelu":
            module = nn.GELU(approximate="tanh")
        elif node.op.kind == "layernorm":
            module = nn.LayerNorm(width_in, eps=attrs["eps"])
        elif node.op.kind == "dropout":
            module = nn.Dropout(attrs["rate"])
        else:
            module = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[node.op.kind]()
        modules[node.name] = module
        previous = node.name
    if previous != graph.output:
        raise InvalidArgument("the chain does not end at the output node", field=graph.output)
    sequential = nn.Sequential(modules)
    state = {name: tensor.to(torch.get_default_dtype()) for name, tensor in to_state_dict(spec, params).items()}
    sequential.load_state_dict(state)
    return sequential
