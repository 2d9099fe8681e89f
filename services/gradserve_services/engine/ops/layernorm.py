"""Layer normalisation over the feature axis, with a learned scale and shift."""

from __future__ import annotations

from .base import Attribute, Op

__all__ = ["LayerNorm"]


class LayerNorm(Op):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the feature axis (biased variance)."""

    kind = "layernorm"
    attributes = {"eps": Attribute(float, default=1e-5, low=0, high=1, low_open=True)}

    def parameter_suffixes(self, node):
        return ("weight", "bias")

    def parameter_shapes(self, node, input_widths):
        return {f"{node.name}.weight": (input_widths[0],), f"{node.name}.bias": (input_widths[0],)}

    def forward(self, node, ctx, inputs, params):
        xp, (x,) = ctx.xp, inputs
        centered = x - x.mean(axis=1, keepdims=True)
        inv_std = 1 / xp.sqrt((centered * centered).mean(axis=1, keepdims=True) + node.attrs["eps"])
        normed = centered * inv_std
        out = ctx.buffer(node.name, "out", x.shape)
        xp.multiply(normed, params[f"{node.name}.weight"], out=out)
        out += params[f"{node.name}.bias"]
        return out, (normed, inv_std)

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        xp, (normed, inv_std) = ctx.xp, saved
        param_grads.write(f"{node.name}.weight", lambda out: xp.sum(grad_out * normed, axis=0, out=out))
        param_grads.write(f"{node.name}.bias", lambda out: xp.sum(grad_out, axis=0, out=out))
        if not wants[0]:
            return [None]
        d_normed = grad_out * params[f"{node.name}.weight"]
        mean_d = d_normed.mean(axis=1, keepdims=True)
        mean_d_normed = (d_normed * normed).mean(axis=1, keepdims=True)
        dx = ctx.buffer(node.name, "grad_in", grad_out.shape)
        xp.multiply(d_normed - mean_d - normed * mean_d_normed, inv_std, out=dx)
        return [dx]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        xp, (normed, inv_std), (dx,) = ctx.xp, saved, tangents
        dy = ctx.buffer(node.name, "tangent", out.shape)
        xp.multiply(normed, param_tangents[f"{node.name}.weight"], out=dy)
        dy += param_tangents[f"{node.name}.bias"]
        if dx is not None:
            d_centered = dx - dx.mean(axis=1, keepdims=True)
            # d(normed) = inv_std * (d_centered - normed * mean(normed * d_centered))
            d_normed = inv_std * (d_centered - normed * (normed * d_centered).mean(axis=1, keepdims=True))
            dy += d_normed * params[f"{node.name}.weight"]
        return dy
