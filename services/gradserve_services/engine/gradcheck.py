"""Finite-difference gradient check: central differences of the mean loss, one element at a time.

Meant for float64 and small models (two passes per parameter element). The comparison is
elementwise `|analytic - numeric| <= atol + rtol * |numeric|`; `worst` reports, per parameter, the
largest ratio of error to that tolerance, so a check passes when every ratio is <= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sparse_rows import dense_gradients

__all__ = ["numerical_gradient", "gradcheck", "GradcheckReport"]


def numerical_gradient(loss_of, params: dict, eps: float = 1e-6) -> dict:
    """d loss_of(params) / d params by central differences; `loss_of` returns a float."""
    grads = {}
    for name, value in params.items():
        grad = value.copy()
        flat_value, flat_grad = value.reshape(-1), grad.reshape(-1)
        for index in range(flat_value.size):
            original = flat_value[index].copy()
            flat_value[index] = original + eps
            upper = loss_of(params)
            flat_value[index] = original - eps
            lower = loss_of(params)
            flat_value[index] = original
            flat_grad[index] = (upper - lower) / (2 * eps)
        grads[name] = grad
    return grads


@dataclass(frozen=True)
class GradcheckReport:
    analytic: dict
    numeric: dict
    worst: dict  # parameter name -> max(|analytic - numeric| / (atol + rtol |numeric|))

    @property
    def ok(self) -> bool:
        return all(ratio <= 1 for ratio in self.worst.values())


def gradcheck(model, params, x, y, *, eps=1e-6, rtol=1e-5, atol=1e-8, **pass_options) -> GradcheckReport:
    """Compare `model.loss_and_grad` with central differences of its mean loss. Works on copies,
    so `params` is left untouched; `pass_options` (train, seed, ...) go to both sides alike.
    Tables' gradients are compared whole (rows not touched: 0 on both sides)."""
    params = {name: value.copy() for name, value in params.items()}
    _, analytic = model.loss_and_grad(params, x, y, **pass_options)
    analytic = dense_gradients(analytic)
    numeric = numerical_gradient(lambda p: model.loss_and_grad(p, x, y, **pass_options)[0], params, eps)
    xp = model.xp
    worst = {
        name: float(xp.max(xp.abs(analytic[name] - numeric[name]) / (atol + rtol * xp.abs(numeric[name]))))
        for name in analytic
    }
    return GradcheckReport(analytic, numeric, worst)
