"""What a model is, without running it: its inputs, every parameter (name, shape, dtype, the layout
a client must write it in), parameter count, FLOPs and activation bytes per batch row; and what the
engine accepts at all (ops with their attributes and ranges, losses with their targets).

Everything is read from the op and loss classes and the parsed graph; the two tables below hold only
what an op class does not say itself (the layout of each parameter it makes, and a FLOP estimate),
keyed by the op's kind, and a test checks they cover every op in `OPS`.

FLOPs count a multiply-add as two, per batch row, of the forward pass in training mode; the backward
estimate counts the two matrix products of a dense layer (dL/dx only where an input needs it) and
twice the forward FLOPs of every other node. Lookups move rows and count none. Activation bytes
are the bytes of every node's output for one row (what a forward keeps for its backward), in the
parameters' dtype.
"""

from __future__ import annotations

import math

import numpy

from .inputs import BAG
from .losses import LOSSES
from .ops import OPS, Attribute, Choice
from .spec import Graph, parse_spec

__all__ = ["describe_model", "op_catalogue", "loss_catalogue", "PARAMETER_LAYOUTS", "LOSS_TARGETS"]

# (op kind, parameter suffix) -> the layout of NODE.<suffix>, as a client must send it.
PARAMETER_LAYOUTS = {
    ("dense", "weight"): "(in, units), row-major: out = x @ weight + bias (the transpose of torch's Linear.weight)",
    ("dense", "bias"): "(units,): added to every row",
    ("layernorm", "weight"): "(features,): the scale applied after normalising each row",
    ("layernorm", "bias"): "(features,): the shift added after scaling",
    ("embedding", "weight"): "(rows, dim), row-major: row i is the vector of id i (as torch's Embedding.weight)",
    ("embedding_bag", "weight"): "(rows, dim), row-major: row i is the vector of id i (as torch's EmbeddingBag.weight)",
}

# Each loss: the targets (`batch.y`) it takes and how it reduces over rows and features.
LOSS_TARGETS = {
    "softmax_cross_entropy": ("int64 (or int32) labels, shape (rows,), each in [0, output width)",
                              "per row: logsumexp(z) - z[label]; the batch loss is the mean over rows"),
    "binary_cross_entropy": ("float targets in [0, 1], shape (rows, output width), the parameters' dtype",
                             "with logits; per row: the mean over output features; the batch loss is "
                             "the mean over rows (torch's reduction='mean')"),
    "mse": ("float targets, shape (rows, output width), the parameters' dtype",
            "per row: the mean over output features of (z - y)^2; the batch loss is the mean over rows "
            "(torch's reduction='mean')"),
}

_ELEMENTWISE_FLOPS = {"relu": 1, "leaky_relu": 2, "sigmoid": 4, "tanh": 4, "gelu": 10, "dropout": 1}


def _forward_flops(node, input_widths: list[int], width: int) -> int:
    kind = node.op.kind
    if kind == "dense":
        return 2 * input_widths[0] * width + (width if node.attrs["bias"] else 0)
    if kind in _ELEMENTWISE_FLOPS:
        return _ELEMENTWISE_FLOPS[kind] * width
    if kind == "add":
        return (len(input_widths) - 1) * width
    if kind == "layernorm":
        return 8 * width
    if kind == "dot_interaction":
        first = input_widths[0] if node.attrs["concat_first"] else 0
        dim = node.attrs["dim"] or input_widths[0]
        return 2 * dim * (width - first)
    if kind in ("concat", "embedding", "embedding_bag"):
        return 0
    raise KeyError(kind)  # a new op needs its estimate here (test_engine_describe checks every op)


def describe_model(spec, dtype="float32") -> dict:
    """A JSON-able description of `spec` with parameters in `dtype` (SpecError as `parse_spec`)."""
    graph: Graph = parse_spec(spec)
    dtype = numpy.dtype(dtype)
    itemsize = dtype.itemsize
    parameters = []
    for node in graph.nodes:
        widths = [graph.widths[source] for source in node.inputs]
        shapes = node.op.parameter_shapes(node, widths)
        for suffix in node.op.parameter_suffixes(node):
            name = f"{node.name}.{suffix}"
            shape = tuple(int(d) for d in shapes[name])
            parameters.append({
                "name": name, "node": node.name, "op": node.op.kind, "role": suffix, "shape": shape,
                "dtype": dtype.name, "count": math.prod(shape), "table": name in graph.tables,
                "layout": PARAMETER_LAYOUTS[node.op.kind, suffix],
            })
    nodes, forward, backward = [], 0, 0
    for node in graph.nodes:
        widths = [graph.widths[source] for source in node.inputs]
        width = int(graph.widths[node.name])
        flops = _forward_flops(node, widths, width)
        if node.op.kind == "dense":  # dL/dw always, dL/dx where the input needs a gradient
            grad_input = graph.needs_grad.get(node.inputs[0], False)
            node_backward = flops + (2 * widths[0] * width if grad_input else 0)
        else:
            node_backward = 2 * flops
        forward, backward = forward + flops, backward + node_backward
        nodes.append({"name": node.name, "op": node.op.kind, "inputs": list(node.inputs), "width": width,
                      "flops_per_row": flops, "activation_bytes_per_row": width * itemsize})
    inputs = [{"name": decl.name, "kind": decl.kind, "width": decl.width or 0,
               "tensors": [f"batch.{tensor}" for tensor in decl.tensor_names()]}
              for decl in graph.inputs.values()]
    targets, reduction = LOSS_TARGETS[graph.loss]
    return {
        "inputs": inputs,
        "parameters": parameters,
        "parameter_count": sum(p["count"] for p in parameters),
        "parameter_bytes": sum(p["count"] for p in parameters) * itemsize,
        "nodes": nodes,
        "output": graph.output,
        "output_width": int(graph.widths[graph.output]),
        "loss": graph.loss,
        "loss_targets": targets,
        "loss_reduction": reduction,
        "dtype": dtype.name,
        "forward_flops_per_row": forward,
        "backward_flops_per_row": backward,
        "activation_bytes_per_row": sum(n["activation_bytes_per_row"] for n in nodes)
        + sum((d.width or 0) * itemsize for d in graph.inputs.values() if d.kind != BAG),
    }


def _attribute(name: str, attribute: Attribute) -> dict:
    required = attribute.default is Attribute.REQUIRED
    described = {"name": name, "type": attribute.kind.__name__, "required": required,
                 "default": None if required else attribute.default}
    if isinstance(attribute, Choice):
        described["choices"] = list(attribute.choices)
    if attribute.low is not None:
        described.update(low=attribute.low, low_inclusive=not attribute.low_open)
    if attribute.high is not None:
        described.update(high=attribute.high, high_inclusive=not attribute.high_open)
    return described


def op_catalogue() -> list[dict]:
    """Every op the engine knows: inputs it takes, attributes with defaults and ranges, the
    parameters it makes and their layouts."""
    catalogue = []
    for kind, op in OPS.items():
        fewest, most = op.arity
        catalogue.append({
            "name": kind,
            "min_inputs": fewest,
            "max_inputs": most or 0,
            "reads": op.reads,
            "attributes": [_attribute(name, attribute) for name, attribute in op.attributes.items()],
            "parameters": {suffix: layout for (op_kind, suffix), layout in PARAMETER_LAYOUTS.items()
                           if op_kind == kind},
            "doc": " ".join((op.__doc__ or "").split()),
        })
    return catalogue


def loss_catalogue() -> list[dict]:
    return [{"name": name, "targets": LOSS_TARGETS[name][0], "reduction": LOSS_TARGETS[name][1],
             "doc": " ".join((type(loss).__doc__ or "").split())} for name, loss in LOSSES.items()]


