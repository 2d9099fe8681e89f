"""Whether an update would leave a parameter or its state non-finite, decided before applying it.

A cheap bound settles ordinary updates; only a parameter whose bound cannot rule an overflow out
gets a dry run of its rule on copies of each block, so the verdict is exactly the update's.
"""

from __future__ import annotations

import math

import numpy as np

from gradserve_services.errors import FailedPrecondition
from gradserve_services.optim.blocks import BLOCK_ELEMENTS, all_finite, parameter_blocks
from gradserve_services.optim.rules import RULES

__all__ = ["check_update", "provably_finite"]


def check_update(config, params, grad_parts, state, plan) -> None:
    """Raise FailedPrecondition if applying `plan` would make a gradient, a parameter or its state
    non-finite; changes nothing."""
    # Only parameters whose bound cannot rule an overflow out get the dry run: for ordinary
    # values that is none, and the check costs a few BLAS reductions instead of a second update.
    uncertain = {name: param for name, param in params.items()
                 if not provably_finite(config, param, [part[name] for part in grad_parts],
                                         state[name], plan)}
    if uncertain:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is the finding
            _dry_run(config, uncertain, grad_parts, state, plan)


def _dry_run(config, params, grad_parts, state, plan) -> None:
    rule = RULES[config.name]
    copies = None  # block-sized buffers the trial update runs in: parameter, then state slots
    for name, param, grad, slots, scratch in parameter_blocks(params, grad_parts, state):
        if not all_finite(grad):
            raise FailedPrecondition(
                f"the gradient of {name!r} is not finite (the model overflows on this batch); "
                "nothing was applied", f"gradients.{name}")
        if copies is None or copies[0].size < param.size or copies[0].dtype != param.dtype:
            copies = [np.empty(max(param.size, BLOCK_ELEMENTS), param.dtype)
                      for _ in range(1 + len(slots))]
        trial = copies[0][:param.size]
        np.copyto(trial, param)
        trial_state = {}
        for copy, (slot, value) in zip(copies[1:], slots.items()):
            trial_state[slot] = copy[:value.size]
            np.copyto(trial_state[slot], value)
        rule(config, trial, grad, trial_state, scratch, plan.scale, plan.coefficients)
        if not (all_finite(trial) and all(all_finite(value) for value in trial_state.values())):
            raise FailedPrecondition(
                f"this update would make {name!r} non-finite ({config.name} at lr "
                f"{plan.lr:g}); nothing was applied", f"parameters.{name}")


def provably_finite(config, param, grads, state, plan) -> bool:
    """Whether a bound on every value the update rule computes for this parameter stays far
    below the dtype's largest: then the dry run could only pass. The bounds use 2-norms (one
    BLAS pass each, at least the largest magnitude; a sum of parts is bounded by the sum of
    their norms); a NaN or infinity anywhere fails the test and leaves the verdict to the dry
    run."""
    c = plan.coefficients
    limit = float(np.finfo(param.dtype).max) / 16

    def magnitude(array) -> float:
        flat = np.ravel(array)
        with np.errstate(over="ignore", invalid="ignore"):
            return math.sqrt(float(np.dot(flat, flat)))

    weights, decay = magnitude(param), abs(config.weight_decay)
    step = abs(plan.scale) * sum(magnitude(grad) for grad in grads)
    if config.name != "adamw":
        step += decay * weights  # L2 decay joins the gradient
    lr = abs(c["lr"])
    if config.name == "sgd":
        bounds = [step, weights + lr * step]
    elif config.name in ("momentum", "nesterov"):
        momentum = abs(config.momentum)
        buffer = momentum * magnitude(state["momentum_buffer"]) + step
        bounds = [step, buffer, weights + lr * (step + (1 + momentum) * buffer)]
    else:  # adam, adamw: the denominator is at least eps, so |exp_avg| / eps bounds the step
        if config.eps <= 0:
            return False
        if config.name == "adamw":
            weights *= 1.0 + lr * decay
        average = magnitude(state["exp_avg"]) + step
        square = magnitude(state["exp_avg_sq"]) + step * step
        change = lr / c["bias_correction1"] * average / config.eps
        bounds = [step, step * step, average, square,
                  math.sqrt(square) / c["bias_correction2_sqrt"] + config.eps, change, weights + change]
    return all(bound < limit for bound in bounds)  # False for NaN
