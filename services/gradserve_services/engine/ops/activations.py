"""Elementwise activations: each forward keeps what its derivative needs."""

from __future__ import annotations

import math

from .base import Attribute, Op

__all__ = ["Elementwise", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "GELU", "stable_sigmoid"]


class Elementwise(Op):
    """y = f(x) element by element. Backward and tangent are the chain rule with f'(x) (`slope`):
    a subclass gives `value` (which may keep what `slope` needs) and `slope`."""

    def value(self, xp, x, out, attrs):
        """Write f(x) into out; return what `slope` needs."""
        raise NotImplementedError

    def slope(self, xp, saved, attrs, out):
        """Write f'(x) into out and return it."""
        raise NotImplementedError

    def forward(self, node, ctx, inputs, params):
        out = ctx.buffer(node.name, "out", inputs[0].shape)
        return out, self.value(ctx.xp, inputs[0], out, node.attrs)

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        dx = self.slope(ctx.xp, saved, node.attrs, ctx.buffer(node.name, "grad_in", grad_out.shape))
        return [ctx.xp.multiply(dx, grad_out, out=dx)]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        if tangents[0] is None:
            return None
        dy = self.slope(ctx.xp, saved, node.attrs, ctx.buffer(node.name, "tangent", out.shape))
        return ctx.xp.multiply(dy, tangents[0], out=dy)


class ReLU(Elementwise):
    kind = "relu"

    def forward(self, node, ctx, inputs, params):
        (x,) = inputs
        # A zero row, not the scalar 0: numpy's broadcast scalar misses the vectorised loop.
        out = ctx.xp.maximum(x, ctx.filled(0, x.shape[1]), out=ctx.buffer(node.name, "out", x.shape))
        return out, out

    def slope(self, xp, y, attrs, out):
        # Like PyTorch: slope 0 at x == 0. `y > 0` read back as 0/1 in the parameter dtype.
        return xp.greater(y, 0, out=out)

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        # Hot path of the benchmark models: a bool mask times grad_out measures faster than the
        # generic rule (0/1 written in the float dtype, then multiplied).
        dx = ctx.buffer(node.name, "grad_in", grad_out.shape)
        mask = ctx.xp.greater(saved, 0, out=ctx.buffer(node.name, "mask", grad_out.shape, dtype=bool))
        return [ctx.xp.multiply(grad_out, mask, out=dx)]


class LeakyReLU(Elementwise):
    kind = "leaky_relu"
    attributes = {"alpha": Attribute(float, default=0.01)}

    def value(self, xp, x, out, attrs):
        xp.multiply(x, attrs["alpha"], out=out)
        positive = x > 0
        out[positive] = x[positive]
        return x

    def slope(self, xp, x, attrs, out):
        out.fill(attrs["alpha"])
        out[x > 0] = 1
        return out


class Sigmoid(Elementwise):
    kind = "sigmoid"

    def value(self, xp, x, out, attrs):
        return stable_sigmoid(xp, x, out)

    def slope(self, xp, y, attrs, out):
        xp.subtract(1, y, out=out)
        return xp.multiply(out, y, out=out)


class Tanh(Elementwise):
    kind = "tanh"

    def value(self, xp, x, out, attrs):
        return xp.tanh(x, out=out)

    def slope(self, xp, y, attrs, out):
        xp.multiply(y, y, out=out)
        return xp.subtract(1, out, out=out)


class GELU(Elementwise):
    """The tanh approximation: 0.5 x (1 + tanh(k (x + c x^3))), k = sqrt(2 / pi), c = 0.044715."""

    kind = "gelu"
    K = math.sqrt(2.0 / math.pi)
    C = 0.044715

    def value(self, xp, x, out, attrs):
        inner = self.K * (x + self.C * x**3)
        xp.multiply(0.5 * x, 1 + xp.tanh(inner), out=out)
        return x

    def slope(self, xp, x, attrs, out):
        t = xp.tanh(self.K * (x + self.C * x**3))
        d_inner = self.K * (1 + 3 * self.C * x * x)
        out[...] = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * d_inner
        return out


def stable_sigmoid(xp, x, out):
    """1 / (1 + exp(-x)) without overflow: exp only ever sees -|x|."""
    e = xp.exp(-xp.abs(x))
    positive = x >= 0
    xp.divide(xp.where(positive, 1, e), 1 + e, out=out)
    return out
