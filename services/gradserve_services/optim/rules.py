"""The update rules: one function per optimizer, updating one block in place.

Rules follow `torch.optim` exactly (same operation order), so float64 trajectories match it. Each
takes `(config, param, grad, state, scratch, scale, c)`: `scratch` holds two block-sized buffers it
may overwrite, `c` the step's coefficients (`coefficients`). `grad` may be a read-only view of a
worker's gradient, so it is never written. Momentum and Adam state start at zero, which gives
exactly torch's first step (0 * beta + g == g).
"""

from __future__ import annotations

import math

import numpy as np

from gradserve_services.optim.config import OptimizerConfig

__all__ = ["STATE_SLOTS", "RULES", "coefficients"]

# The state arrays each optimizer keeps per parameter, named as torch names them.
STATE_SLOTS = {
    "sgd": (),
    "momentum": ("momentum_buffer",),
    "nesterov": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}


def coefficients(config: OptimizerConfig, lr: float, step: int) -> dict:
    """The scalars of update `step` (1-based, torch's `state["step"]`)."""
    return {
        "lr": lr,
        "bias_correction1": 1.0 - config.beta1 ** step,
        "bias_correction2_sqrt": math.sqrt(1.0 - config.beta2 ** step),
    }


def _scaled_grad(config, param, grad, scratch, scale, *, l2: bool):
    np.multiply(grad, scale, out=scratch)
    if l2 and config.weight_decay:
        scratch += config.weight_decay * param
    return scratch


def sgd(config, param, grad, state, scratch, scale, c):
    g = _scaled_grad(config, param, grad, scratch[0], scale, l2=True)
    g *= -c["lr"]
    param += g


def _momentum_step(config, param, grad, state, scratch, scale):
    """(g, buf): the scaled gradient and the momentum buffer after `buf = momentum * buf + g`."""
    g = _scaled_grad(config, param, grad, scratch[0], scale, l2=True)
    buf = state["momentum_buffer"]
    buf *= config.momentum
    buf += g
    return g, buf


def momentum(config, param, grad, state, scratch, scale, c):
    g, buf = _momentum_step(config, param, grad, state, scratch, scale)
    np.multiply(buf, -c["lr"], out=g)
    param += g


def nesterov(config, param, grad, state, scratch, scale, c):
    g, buf = _momentum_step(config, param, grad, state, scratch, scale)
    np.multiply(buf, config.momentum, out=scratch[1])
    g += scratch[1]
    g *= -c["lr"]
    param += g


def adam(config, param, grad, state, scratch, scale, c):
    _adam(config, param, grad, state, scratch, scale, c, l2=True)


def adamw(config, param, grad, state, scratch, scale, c):
    if config.weight_decay:
        param *= 1.0 - c["lr"] * config.weight_decay
    _adam(config, param, grad, state, scratch, scale, c, l2=False)


def _adam(config, param, grad, state, scratch, scale, c, *, l2: bool):
    g = _scaled_grad(config, param, grad, scratch[0], scale, l2=l2)
    other = scratch[1]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    # torch: exp_avg.lerp_(grad, 1 - beta1) == exp_avg + (1 - beta1) * (grad - exp_avg)
    np.subtract(g, exp_avg, out=other)
    other *= 1.0 - config.beta1
    exp_avg += other
    # torch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg_sq *= config.beta2
    np.multiply(g, g, out=other)
    other *= 1.0 - config.beta2
    exp_avg_sq += other
    # torch: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    np.sqrt(exp_avg_sq, out=other)
    other /= c["bias_correction2_sqrt"]
    other += config.eps
    # torch: param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    np.divide(exp_avg, other, out=other)
    other *= -c["lr"] / c["bias_correction1"]
    param += other


RULES = {"sgd": sgd, "momentum": momentum, "nesterov": nesterov, "adam": adam, "adamw": adamw}
