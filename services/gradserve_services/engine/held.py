"""A forward pass whose activations are kept for a later backward pass: the two halves of a
training step whose loss is computed elsewhere (the caller sends dL/d output in between).

`hold_forward` runs the pass in a `Workspace` of its own, so the saved activations survive any
number of other passes of the same `Model` (whose shared workspace the next pass overwrites), and
`nbytes` says exactly what holding them costs. `backward_held` pulls an output gradient back
through them once: no forward is recomputed. The gradients are sums over the rows, never averaged
(the vector-Jacobian product of the gradient given, as `vjp.vjp`), and, when asked, come with the
input gradients of the float inputs (for a model in the middle of a chain).
"""

from __future__ import annotations

from dataclasses import dataclass

from .context import PassContext
from .grad_sums import GradSums
from .model import Model, _check_options
from .inputs import FLOAT
from .vjp import VJP, _needs_with_inputs, checked_output_gradient
from .workspace import Workspace

__all__ = ["HeldForward", "hold_forward", "backward_held"]


@dataclass
class HeldForward:
    output: object  # the output node's values, a fresh array the caller may keep
    rows: int
    dtype: object  # the pass dtype (the parameters')
    params: dict  # the parameters the pass ran at (activations may refer to them)
    _ctx: PassContext
    _saved: dict

    @property
    def nbytes(self) -> int:
        """Bytes kept alive by holding this pass: its workspace (activations, masks) and output."""
        return self._ctx.workspace.nbytes + self.output.nbytes


def hold_forward(model: Model, params, x, *, train=False, seed=0) -> HeldForward:
    """The forward pass of the whole batch `x` at `params`, activations kept. `train` and `seed`
    as in `Model.loss_and_grad_sum` (dropout masks depend on them and on the row index)."""
    _check_options(None, seed, 0)
    with model._lock:  # validation only; the pass itself touches nothing shared
        dtype = model.validate_parameters(params, check_values=False)
        batch, _, pass_dtype = model._checked_batch_and_targets(x, None, dtype)
    ctx = PassContext(model.xp, pass_dtype, Workspace(model.xp), bool(train), int(seed), 0)
    out, saved = model._forward(ctx, params, batch)
    return HeldForward(model.xp.array(out, copy=True), batch.rows, pass_dtype, params, ctx, saved)


def backward_held(model: Model, held: HeldForward, output_gradient, *, input_gradient: bool = False) -> VJP:
    """dL/dw summed over the rows for `output_gradient` (shape (rows, output width), the pass
    dtype, finite), from the activations `held` kept; tables' gradients as `SparseRows`. With
    `input_gradient`, dL/dx of every float input by tensor name (`x` for the single input)."""
    grad = checked_output_gradient(model, output_gradient, held.rows, held.dtype)
    ctx, xp = held._ctx, model.xp
    sums = GradSums(xp, model.graph.parameter_shapes, held.dtype, ctx.workspace, model.graph.tables)
    needs = _needs_with_inputs(model.graph) if input_gradient else None
    left = model._backward(ctx, held.params, grad, held._saved, sums, needs)
    if not input_gradient:
        return VJP(sums.result(), None)
    inputs = {}
    for decl in model.graph.inputs.values():
        if decl.kind == FLOAT:  # an input nothing reads has gradient 0; `left` may be scratch
            value = left.get(decl.name)
            inputs[decl.tensor] = xp.zeros((held.rows, decl.width), held.dtype) if value is None \
                else xp.array(value, copy=True)
    return VJP(sums.result(), inputs)
