"""The dense (fully connected) layer."""

from __future__ import annotations

from .base import Attribute, Op

__all__ = ["Dense"]


class Dense(Op):
    """z = x @ W + b. W is (in, units): `x @ W` and `x.T @ dz` run as BLAS calls without copies."""

    kind = "dense"
    attributes = {"units": Attribute(int, low=1, high=1 << 20), "bias": Attribute(bool, default=True)}

    def output_width(self, node, input_widths):
        return node.attrs["units"]

    def parameter_suffixes(self, node):
        return ("weight", "bias") if node.attrs["bias"] else ("weight",)

    def parameter_shapes(self, node, input_widths):
        shapes = {f"{node.name}.weight": (input_widths[0], node.attrs["units"])}
        if node.attrs["bias"]:
            shapes[f"{node.name}.bias"] = (node.attrs["units"],)
        return shapes

    def forward(self, node, ctx, inputs, params):
        (x,) = inputs
        z = ctx.buffer(node.name, "out", (x.shape[0], node.attrs["units"]))
        ctx.xp.matmul(x, params[f"{node.name}.weight"], out=z)
        if node.attrs["bias"]:
            z += params[f"{node.name}.bias"]
        return z, x

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        xp, x = ctx.xp, saved
        param_grads.write(f"{node.name}.weight", lambda out: xp.matmul(x.T, grad_out, out=out))
        if node.attrs["bias"]:  # the column sums of grad_out, as a BLAS gemv: ones @ grad_out
            ones = ctx.filled(1, grad_out.shape[0])
            param_grads.write(f"{node.name}.bias", lambda out: xp.matmul(ones, grad_out, out=out))
        if not wants[0]:  # e.g. the batch input: nothing consumes its gradient
            return [None]
        dx = ctx.buffer(node.name, "grad_in", x.shape)
        return [xp.matmul(grad_out, params[f"{node.name}.weight"].T, out=dx)]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        xp, (x,), (dx,) = ctx.xp, inputs, tangents
        dz = ctx.buffer(node.name, "tangent", out.shape)
        xp.matmul(x, param_tangents[f"{node.name}.weight"], out=dz)
        if dx is not None:
            dz += xp.matmul(dx, params[f"{node.name}.weight"], out=ctx.buffer(node.name, "tangent_in", out.shape))
        if node.attrs["bias"]:
            dz += param_tangents[f"{node.name}.bias"]
        return dz
