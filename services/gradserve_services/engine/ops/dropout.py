"""Dropout with masks that are a function of (seed, node, global sample index, feature), so sharding
and micro-batching never change them."""

from __future__ import annotations

from .base import Attribute, Op

__all__ = ["Dropout"]


class Dropout(Op):
    """Inverted dropout: in training, kept features are scaled by 1 / (1 - rate); identity in eval.
    The mask comes from `ctx.dropout_mask`, a function of (seed, node, global sample, feature)."""

    kind = "dropout"
    attributes = {"rate": Attribute(float, low=0, high=1, high_open=True)}

    def forward(self, node, ctx, inputs, params):
        (x,) = inputs
        if not ctx.train or node.attrs["rate"] == 0:
            return x, None
        mask = ctx.dropout_mask(node.name, x.shape, node.attrs["rate"])
        return ctx.xp.multiply(x, mask, out=ctx.buffer(node.name, "out", x.shape)), mask

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        if saved is None:
            return [grad_out]
        return [ctx.xp.multiply(grad_out, saved, out=ctx.buffer(node.name, "grad_in", grad_out.shape))]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        if saved is None or tangents[0] is None:
            return tangents[0]
        return ctx.xp.multiply(tangents[0], saved, out=ctx.buffer(node.name, "tangent", out.shape))
