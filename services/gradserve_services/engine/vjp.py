"""The model as a function: its output (or any nodes') for a batch, and vector-Jacobian products.

`vjp` takes dL/d(output) from whatever loss the caller computes and answers dL/dw for every
parameter and, when asked, dL/dx for every float input: exactly the vector-Jacobian product of the
given output gradient, no averaging (a caller whose loss is a mean puts the 1/N in the gradient).
Micro-batches sum the parameter gradients and fill the input gradient row range by row range, so
the answer does not depend on the micro-batch size. Ids and bag inputs are not differentiable; a
bag's per-value weights get no gradient either.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradserve_services.errors import InvalidArgument

from .grad_sums import GradSums
from .inputs import FLOAT
from .model import Model, _check_options, _micro_batches

__all__ = ["VJP", "vjp", "forward_nodes", "checked_output_gradient", "OUTPUT_GRADIENT_FIELD", "NODES_FIELD"]

OUTPUT_GRADIENT_FIELD = "output_gradient"
NODES_FIELD = "nodes"


@dataclass(frozen=True)
class VJP:
    gradients: dict  # parameter name -> dL/dw (a table's as SparseRows), model order
    input_gradients: dict | None  # batch tensor name (`x` for the single input) -> dL/dx


def vjp(model: Model, params, x, output_gradient, *, input_gradient=False, micro_batch_size=None,
        train=False, seed=0, sample_offset=0) -> VJP:
    """Pull `output_gradient` (shape (rows, output width), the pass dtype, finite) back through
    the model. `train`, `seed` and `sample_offset` must match the forward pass the caller
    differentiated (dropout masks depend on them); the default matches `Model.forward`'s."""
    _check_options(micro_batch_size, seed, sample_offset)
    with model._lock:
        dtype = model.validate_parameters(params, check_values=False)
        batch, _, pass_dtype = model._checked_batch_and_targets(x, None, dtype)
        grad = checked_output_gradient(model, output_gradient, batch.rows, pass_dtype)
        needs = _needs_with_inputs(model.graph) if input_gradient else None
        float_inputs = [decl for decl in model.graph.inputs.values() if decl.kind == FLOAT]
        input_grads = (
            {decl.tensor: model.xp.zeros((batch.rows, decl.width), dtype=pass_dtype) for decl in float_inputs}
            if input_gradient else None
        )
        sums = GradSums(model.xp, model.graph.parameter_shapes, pass_dtype, model._workspace, model.graph.tables)
        for start, stop in _micro_batches(batch.rows, micro_batch_size):
            ctx = model._context(pass_dtype, train, seed, sample_offset + start)
            _, saved = model._forward(ctx, params, batch.slice(model.xp, start, stop))
            left = model._backward(ctx, params, grad[start:stop], saved, sums, needs)
            if input_grads is not None:
                for decl in float_inputs:
                    if decl.name in left:  # an input nothing reads has gradient 0
                        input_grads[decl.tensor][start:stop] = left[decl.name]
        return VJP(sums.result(), input_grads)


def forward_nodes(model: Model, params, x, nodes=None, *, train=False, seed=0, sample_offset=0) -> dict:
    """{node name: its values (a fresh array)} for `nodes` (default: the output node only)."""
    _check_options(None, seed, sample_offset)
    wanted = [model.graph.output] if not nodes else list(nodes)
    known = {node.name for node in model.graph.nodes}
    for index, name in enumerate(wanted):
        if name not in known:
            raise InvalidArgument(f"{name!r} is not a node of this model", field=f"{NODES_FIELD}[{index}]")
        if name in wanted[:index]:  # the answer holds one tensor per node name
            raise InvalidArgument(f"{name!r} is asked for twice", field=f"{NODES_FIELD}[{index}]")
    with model._lock:
        dtype = model.validate_parameters(params, check_values=False)
        batch, _, pass_dtype = model._checked_batch_and_targets(x, None, dtype)
        ctx = model._context(pass_dtype, train, seed, sample_offset)
        values = dict(batch.feeds)
        for node in model.graph.nodes:
            values[node.name], _ = node.op.forward(node, ctx, [values[s] for s in node.inputs], params)
        return {name: model.xp.array(values[name], copy=True) for name in wanted}


def checked_output_gradient(model: Model, grad, rows: int, dtype):
    xp, field = model.xp, OUTPUT_GRADIENT_FIELD
    if not isinstance(grad, xp.ndarray):
        raise InvalidArgument(f"expected an array, got {type(grad).__name__}", field=field)
    if grad.dtype != dtype:
        raise InvalidArgument(f"dtype must be the pass dtype {dtype}, got {grad.dtype}", field=field)
    shape = (rows, model.graph.widths[model.graph.output])
    if tuple(grad.shape) != shape:
        raise InvalidArgument(f"shape must be {shape} (rows, output width), got {tuple(grad.shape)}", field=field)
    if not bool(xp.isfinite(grad).all()):
        raise InvalidArgument("contains NaN or infinity", field=field)
    return grad


def _needs_with_inputs(graph) -> dict:
    """The graph's needs_grad with the float inputs marked too: every node they reach needs one."""
    needs = {name: decl.kind == FLOAT for name, decl in graph.inputs.items()}
    for node in graph.nodes:
        needs[node.name] = graph.needs_grad[node.name] or any(needs[source] for source in node.inputs)
    return needs

