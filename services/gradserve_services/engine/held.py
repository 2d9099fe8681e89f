"""A forward pass whose activations are kept for a later backward pass: the two halves of a
training step whose loss is computed elsewhere (the caller sends dL/d output in between).

`hold_forward` runs the pass in a `Workspace` of its own, so the saved activations survive any
number of other passes of the same `Model` (whose shared workspace the next pass overwrites), and
`nbytes` says exactly what holding them costs. `backward_held` pulls an output gradient back
through them once: no forward is recomputed. The gradients are sums over the rows, never averaged
(the vector-Jacobian product of the gradient given, as `vjp.vjp`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .context import PassContext
from .grad_sums import GradSums
from .model import Model, _check_options
from .vjp import checked_output_gradient
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


def backward_held(model: Model, held: HeldForward, output_gradient) -> dict:
    """dL/dw summed over the rows for `output_gradient` (shape (rows, output width), the pass
    dtype, finite), from the activations `held` kept; tables' gradients as `SparseRows`."""
    grad = checked_output_gradient(model, output_gradient, held.rows, held.dtype)
    ctx = held._ctx
    sums = GradSums(model.xp, model.graph.parameter_shapes, held.dtype, ctx.workspace, model.graph.tables)
    model._backward(ctx, held.params, grad, held._saved, sums)
    return sums.result()
