"""The losses, each fused with its gradient in the numerically stable form.

`value_and_grad(xp, z, y, scale, grad_out)` returns the SUM over the rows of the per-sample loss (a
Python float) and writes `scale * d(sum)/dz` into `grad_out`; the engine passes `scale = 1/count`
when it wants the mean, which is where PyTorch puts it too. Per-sample loss: plain cross-entropy for
softmax; the mean over output features for bce and mse (so the batch mean is PyTorch's
`reduction="mean"`). Forward mode needs nothing more: the loss's tangent is `<grad, tangent of z>`.
"""

from __future__ import annotations

from collections.abc import Mapping

from gradserve_services.errors import InvalidArgument

from .ops import stable_sigmoid

__all__ = ["Loss", "LOSSES"]


class Loss:
    name = ""

    def check_targets(self, xp, y, rows: int, width: int, dtype):
        """Return the targets ready for `value_and_grad`, or raise InvalidArgument(field="batch.y")."""
        raise NotImplementedError

    def value_and_grad(self, xp, z, y, scale: float, grad_out) -> float:
        raise NotImplementedError


class SoftmaxCrossEntropy(Loss):
    """loss_i = logsumexp(z_i) - z_i[y_i]; dz = softmax(z) - onehot(y). The row maximum is
    subtracted before exp, so the sum inside the log is >= 1: never log(0), never overflow."""

    name = "softmax_cross_entropy"

    def check_targets(self, xp, y, rows, width, dtype):
        if not xp.issubdtype(y.dtype, xp.integer):
            raise InvalidArgument(f"labels must be integers (int64), got {y.dtype}", field="batch.y")
        if y.shape != (rows,):
            raise InvalidArgument(f"labels must have shape ({rows},), got {tuple(y.shape)}", field="batch.y")
        if rows and (int(y.min()) < 0 or int(y.max()) >= width):
            raise InvalidArgument(
                f"labels must lie in [0, {width}), got [{int(y.min())}, {int(y.max())}]", field="batch.y"
            )
        return y

    def value_and_grad(self, xp, z, y, scale, grad_out):
        rows = xp.arange(z.shape[0])
        shifted = xp.subtract(z, z.max(axis=1, keepdims=True), out=grad_out)
        picked = shifted[rows, y]  # a copy: the next line overwrites grad_out
        exp = xp.exp(shifted, out=grad_out)
        total = exp.sum(axis=1, keepdims=True)
        loss_sum = float(xp.sum(xp.log(total)) - xp.sum(picked))
        xp.multiply(exp, xp.divide(scale, total), out=grad_out)
        grad_out[rows, y] -= scale
        return loss_sum


class BinaryCrossEntropy(Loss):
    """With logits: l = log(1 + exp(z)) - y z = logaddexp(0, z) - y z; dz = sigmoid(z) - y."""

    name = "binary_cross_entropy"

    def check_targets(self, xp, y, rows, width, dtype):
        y = _float_targets(xp, y, rows, width, dtype)
        if rows and (float(y.min()) < 0 or float(y.max()) > 1):
            raise InvalidArgument("binary cross-entropy targets must lie in [0, 1]", field="batch.y")
        return y

    def value_and_grad(self, xp, z, y, scale, grad_out):
        width = z.shape[1]
        loss_sum = float(xp.sum(xp.logaddexp(0, z) - y * z)) / width
        stable_sigmoid(xp, z, grad_out)
        grad_out -= y
        grad_out *= scale / width
        return loss_sum


class MeanSquaredError(Loss):
    """l = mean over features of (z - y)^2; dz = 2 (z - y) / width."""

    name = "mse"

    def check_targets(self, xp, y, rows, width, dtype):
        return _float_targets(xp, y, rows, width, dtype)

    def value_and_grad(self, xp, z, y, scale, grad_out):
        width = z.shape[1]
        diff = xp.subtract(z, y, out=grad_out)
        loss_sum = float(xp.vdot(diff, diff)) / width
        grad_out *= 2 * scale / width
        return loss_sum


def _float_targets(xp, y, rows, width, dtype):
    if not xp.issubdtype(y.dtype, xp.floating):
        raise InvalidArgument(f"targets must be floating point, got {y.dtype}", field="batch.y")
    if y.shape != (rows, width):
        raise InvalidArgument(f"targets must have shape ({rows}, {width}), got {tuple(y.shape)}", field="batch.y")
    if not bool(xp.isfinite(y).all()):
        raise InvalidArgument("targets contain NaN or infinity", field="batch.y")
    return y.astype(dtype, copy=False)


LOSSES: Mapping[str, Loss] = {loss.name: loss for loss in (SoftmaxCrossEntropy(), BinaryCrossEntropy(), MeanSquaredError())}
