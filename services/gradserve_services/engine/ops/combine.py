"""Ops joining several inputs: their sum and their concatenation along the feature axis."""

from __future__ import annotations

from gradserve_services.errors import SpecError

from .base import Op

__all__ = ["Add", "Concat"]


class Add(Op):
    """Residual sum of >= 2 inputs of equal width; the gradient reaches every input unchanged."""

    kind = "add"
    arity = (2, None)

    def output_width(self, node, input_widths):
        if len(set(input_widths)) != 1:
            raise SpecError(f"add needs inputs of equal width, got {input_widths}", field=node.name)
        return input_widths[0]

    def forward(self, node, ctx, inputs, params):
        out = ctx.xp.add(inputs[0], inputs[1], out=ctx.buffer(node.name, "out", inputs[0].shape))
        for x in inputs[2:]:
            out += x
        return out, None

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        # Shared read-only: the engine never accumulates into an array it did not allocate.
        return [grad_out if wanted else None for wanted in wants]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        present = [t for t in tangents if t is not None]
        if not present:
            return None
        total = ctx.buffer(node.name, "tangent", out.shape)
        total[...] = present[0]
        for t in present[1:]:
            total += t
        return total


class Concat(Op):
    """Inputs side by side on the feature axis; the same input may appear several times."""

    kind = "concat"
    arity = (2, None)

    def output_width(self, node, input_widths):
        return sum(input_widths)

    def forward(self, node, ctx, inputs, params):
        out = ctx.buffer(node.name, "out", (inputs[0].shape[0], sum(x.shape[1] for x in inputs)))
        start = 0
        for x in inputs:
            out[:, start : start + x.shape[1]] = x
            start += x.shape[1]
        return out, [x.shape[1] for x in inputs]

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        grads, start = [], 0
        for width, wanted in zip(saved, wants):
            grads.append(grad_out[:, start : start + width] if wanted else None)
            start += width
        return grads

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        if all(t is None for t in tangents):
            return None
        total, start = ctx.buffer(node.name, "tangent", out.shape), 0
        for width, t in zip(saved, tangents):
            total[:, start : start + width] = 0 if t is None else t
            start += width
        return total
