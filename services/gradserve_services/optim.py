"""Optimizers: SGD, momentum, Nesterov, Adam, AdamW; global-norm clipping; learning-rate schedules.

The parameter server calls `Optimizer.step(params, grad_parts, grad_scale=...)` with the per-worker
gradient SUMS it received and `1 / total_count` as the scale, so the mean gradient is never
materialised: each parameter is walked once in cache-sized blocks that sum the parts, accumulate the
squared norm and update the parameter and its state in place. With clipping the norm must be known
before the first update, so that case makes one extra read-only pass.

Update rules follow `torch.optim` exactly (same operation order), so float64 trajectories match it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping, Sequence

import numpy as np

from gradserve_services.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "ScheduleConfig",
    "OptimizerConfig",
    "Optimizer",
    "learning_rate",
    "global_norm",
    "check_fits_dtype",
    "all_finite",
]

OPTIMIZER_NAMES = ("sgd", "momentum", "nesterov", "adam", "adamw")
SCHEDULE_NAMES = ("constant", "step", "cosine")
# Elements per block: three float32 blocks of this size (parameter, gradient, scratch) stay in L2.
BLOCK_ELEMENTS = 1 << 15
# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); the same guard keeps trajectories equal.
CLIP_EPSILON = 1e-6

_STATE_SLOTS = {
    "sgd": (),
    "momentum": ("momentum_buffer",),
    "nesterov": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "constant"
    warmup_steps: int = 0
    step_size: int = 100
    gamma: float = 0.1
    total_steps: int = 1000
    min_lr: float = 0.0


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    @classmethod
    def from_dict(cls, config: Mapping | "OptimizerConfig" | None) -> "OptimizerConfig":
        """Validate a JSON-able config dict; errors name the field as `optimizer.FIELD`."""
        if isinstance(config, OptimizerConfig):
            return config
        config = dict(config or {})
        schedule = dict(config.pop("schedule", None) or {})
        _reject_unknown(config, {f.name for f in fields(cls)} - {"schedule"}, "optimizer")
        _reject_unknown(schedule, {f.name for f in fields(ScheduleConfig)}, "optimizer.schedule")
        try:
            parsed = cls(**config, schedule=ScheduleConfig(**schedule))
        except TypeError as bad:  # pragma: no cover - unknown keys are rejected above
            raise InvalidArgument(str(bad), "optimizer") from None
        parsed._validate()
        return parsed

    def to_dict(self) -> dict:
        return asdict(self)

    def _validate(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise InvalidArgument(f"unknown optimizer {self.name!r}; one of {OPTIMIZER_NAMES}",
                                  "optimizer.name")
        _check_number(self.lr, "optimizer.lr", low=0.0, low_inclusive=False)
        _check_number(self.momentum, "optimizer.momentum", low=0.0, high=1.0)
        _check_number(self.beta1, "optimizer.beta1", low=0.0, high=1.0, high_inclusive=False)
        _check_number(self.beta2, "optimizer.beta2", low=0.0, high=1.0, high_inclusive=False)
        _check_number(self.eps, "optimizer.eps", low=0.0)
        _check_number(self.weight_decay, "optimizer.weight_decay", low=0.0)
        if self.clip_norm is not None:
            _check_number(self.clip_norm, "optimizer.clip_norm", low=0.0, low_inclusive=False)
        schedule = self.schedule
        if schedule.name not in SCHEDULE_NAMES:
            raise InvalidArgument(f"unknown schedule {schedule.name!r}; one of {SCHEDULE_NAMES}",
                                  "optimizer.schedule.name")
        for name in ("warmup_steps", "step_size", "total_steps"):
            value = getattr(schedule, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"must be a non-negative integer, got {value!r}",
                                      f"optimizer.schedule.{name}")
        if schedule.name == "step" and schedule.step_size < 1:
            raise InvalidArgument("must be >= 1", "optimizer.schedule.step_size")
        _check_number(schedule.gamma, "optimizer.schedule.gamma", low=0.0)
        _check_number(schedule.min_lr, "optimizer.schedule.min_lr", low=0.0)


def _reject_unknown(config: Mapping, known: set, prefix: str) -> None:
    for key in config:
        if key not in known:
            raise InvalidArgument(f"unknown field {key!r}", f"{prefix}.{key}")


def _check_number(value, field_name: str, *, low=None, high=None, low_inclusive=True,
                  high_inclusive=True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number, got {value!r}", field_name)
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise InvalidArgument(f"must be {'>=' if low_inclusive else '>'} {low}, got {value}",
                              field_name)
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise InvalidArgument(f"must be {'<=' if high_inclusive else '<'} {high}, got {value}",
                              field_name)


def check_fits_dtype(config: OptimizerConfig, dtype) -> None:
    """InvalidArgument if a hyperparameter overflows the parameters' dtype: the update arithmetic
    runs in that dtype, where such a value is infinite and turns every update into inf or NaN."""
    largest = float(np.finfo(dtype).max)
    for name, value in (("lr", config.lr), ("eps", config.eps), ("weight_decay", config.weight_decay),
                        ("schedule.min_lr", config.schedule.min_lr)):
        if abs(value) > largest:
            raise InvalidArgument(f"{value:g} overflows {np.dtype(dtype).name} parameters (largest "
                                  f"{largest:g})", f"optimizer.{name}")


def learning_rate(config: OptimizerConfig, update_index: int) -> float:
    """The learning rate of the update with 0-based index `update_index`.

    Warmup ramps linearly from lr/warmup to lr over the first `warmup_steps` updates; the schedule
    proper counts updates after warmup (step: times gamma every `step_size`; cosine: from lr down to
    `min_lr` over `total_steps - warmup_steps`, then stays at `min_lr`).
    """
    schedule = config.schedule
    base = config.lr
    if update_index < schedule.warmup_steps:
        return base * (update_index + 1) / schedule.warmup_steps
    after_warmup = update_index - schedule.warmup_steps
    if schedule.name == "step":
        return base * schedule.gamma ** (after_warmup // schedule.step_size)
    if schedule.name == "cosine":
        span = max(schedule.total_steps - schedule.warmup_steps, 1)
        progress = min(after_warmup / span, 1.0)
        return schedule.min_lr + (base - schedule.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base


def global_norm(grad_parts: Sequence[Mapping[str, np.ndarray]], grad_scale: float = 1.0) -> float:
    """L2 norm over all parameters of `grad_scale * sum(grad_parts)` (float64 accumulation)."""
    return math.sqrt(_squared_norm(grad_parts, grad_scale))


def _squared_norm(grad_parts, grad_scale: float) -> float:
    total = 0.0
    names = list(grad_parts[0]) if grad_parts else []
    scratch = None
    for name in names:
        flats = [np.ravel(part[name]) for part in grad_parts]
        for start in range(0, flats[0].size, BLOCK_ELEMENTS):
            stop = start + BLOCK_ELEMENTS
            block = _sum_block(flats, start, stop, scratch)
            scratch = block if len(flats) > 1 else scratch
            total += float(np.dot(block, block))
    return total * grad_scale * grad_scale


def _sum_block(flats: list[np.ndarray], start: int, stop: int, scratch):
    """The block [start, stop) of the sum of `flats` (a view of the only part when there is one)."""
    if len(flats) == 1:
        return flats[0][start:stop]
    size = min(stop, flats[0].size) - start
    dtype = np.result_type(*(flat.dtype for flat in flats))
    if scratch is None or scratch.size < size or scratch.dtype != dtype:
        scratch = np.empty(max(size, BLOCK_ELEMENTS), dtype=dtype)
    out = scratch[:size]
    np.add(flats[0][start:stop], flats[1][start:stop], out=out)
    for flat in flats[2:]:
        out += flat[start:stop]
    return out


@dataclass(frozen=True)
class _Plan:
    """What one update uses, fixed before it touches anything (so a dry run sees the same)."""

    lr: float
    clip_scale: float
    norm: float | None  # None: computed while updating (no clipping, no norm given)
    scale: float  # applied to the summed gradient: grad_scale times clip_scale
    coefficients: dict


def all_finite(block: np.ndarray) -> bool:
    """Whether every element of a 1-D block is finite."""
    flat = block.reshape(-1)
    # A finite sum of squares (one BLAS pass) proves it; an infinite one may be an overflow of
    # large finite values, which min and max (NaN and infinities propagate) settle exactly.
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.dot(flat, flat))):
            return True
    return bool(np.isfinite(flat.min()) and np.isfinite(flat.max()))


class Optimizer:
    """Per-parameter optimizer state plus the update rule; updates parameter arrays in place."""

    def __init__(self, config: Mapping | OptimizerConfig, params: Mapping[str, np.ndarray]):
        self.config = OptimizerConfig.from_dict(config)
        self.update_count = 0
        self.state: dict[str, dict[str, np.ndarray]] = {
            name: {slot: np.zeros_like(value) for slot in _STATE_SLOTS[self.config.name]}
            for name, value in params.items()
        }

    def step(self, params: Mapping[str, np.ndarray], grad_parts: Sequence[Mapping[str, np.ndarray]],
             *, grad_scale: float = 1.0, norm: float | None = None,
             update_ratios: dict | None = None, products: dict | None = None) -> dict:
        """Apply one update with gradient `grad_scale * sum(grad_parts)` to `params` in place.

        `norm` is the global gradient norm when the caller knows it (a sharded parameter server
        computes it across shards); otherwise it is computed here. Returns
        `{"lr", "grad_norm", "clip_scale"}` for the step's report. An update that would leave a
        parameter or its state non-finite raises FailedPrecondition (see `check`) and changes
        nothing. A dict passed as `update_ratios` receives `|new - old| / |old|` per parameter,
        measured block by block while each block is in cache.
        """
        plan = self._plan(grad_parts, grad_scale, norm)
        self._check_plan(params, grad_parts, plan)
        self.update_count += 1
        squared = self._update_all(params, grad_parts, plan, update_ratios, products)
        norm = plan.norm if plan.norm is not None else math.sqrt(squared) * grad_scale
        return {"lr": plan.lr, "grad_norm": float(norm), "clip_scale": plan.clip_scale}

    def check(self, params: Mapping[str, np.ndarray], grad_parts: Sequence[Mapping[str, np.ndarray]],
              *, grad_scale: float = 1.0, norm: float | None = None) -> None:
        """Raise FailedPrecondition if `step` with these arguments would make a gradient, a
        parameter or its optimizer state non-finite; changes nothing.

        A dry run of the same rules on copies of each block, so its verdict is exactly the
        update's: a sharded parameter server asks every shard before any applies. It costs about
        one more pass over the parameters, the price of never having to undo an update."""
        self._check_plan(params, grad_parts, self._plan(grad_parts, grad_scale, norm))

    def _plan(self, grad_parts, grad_scale: float, norm: float | None) -> "_Plan":
        if not grad_parts:
            raise InvalidArgument("no gradient to apply", "gradients")
        clip_norm = self.config.clip_norm
        if norm is None and clip_norm is not None:
            norm = global_norm(grad_parts, grad_scale)
        clip_scale = 1.0
        if clip_norm is not None and norm + CLIP_EPSILON > 0:
            clip_scale = min(1.0, clip_norm / (norm + CLIP_EPSILON))
        lr = learning_rate(self.config, self.update_count)
        # torch's `state["step"]` after its `+= 1`: this update's 1-based index
        return _Plan(lr, clip_scale, norm, grad_scale * clip_scale,
                     self._coefficients(lr, self.update_count + 1))

    def _check_plan(self, params, grad_parts, plan: "_Plan") -> None:
        # Only parameters whose bound cannot rule an overflow out get the dry run: for ordinary
        # values that is none, and the check costs a few BLAS reductions instead of a second update.
        uncertain = {name: param for name, param in params.items()
                     if not self._provably_finite(param, [part[name] for part in grad_parts],
                                                  self.state[name], plan)}
        if uncertain:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is the finding
                self._dry_run(uncertain, grad_parts, plan)

    def _dry_run(self, params, grad_parts, plan: "_Plan") -> None:
        rule = getattr(self, f"_block_{self.config.name}")
        copies = None  # block-sized buffers the trial update runs in: parameter, then state slots
        for name, param, grad, state, scratch in self._blocks(params, grad_parts):
            if not all_finite(grad):
                raise FailedPrecondition(
                    f"the gradient of {name!r} is not finite (the model overflows on this batch); "
                    "nothing was applied", f"gradients.{name}")
            if copies is None or copies[0].size < param.size or copies[0].dtype != param.dtype:
                copies = [np.empty(max(param.size, BLOCK_ELEMENTS), param.dtype)
                          for _ in range(1 + len(state))]
            trial = copies[0][:param.size]
            np.copyto(trial, param)
            trial_state = {}
            for copy, (slot, value) in zip(copies[1:], state.items()):
                trial_state[slot] = copy[:value.size]
                np.copyto(trial_state[slot], value)
            rule(trial, grad, trial_state, scratch, plan.scale, plan.coefficients)
            if not (all_finite(trial) and all(all_finite(value) for value in trial_state.values())):
                raise FailedPrecondition(
                    f"this update would make {name!r} non-finite ({self.config.name} at lr "
                    f"{plan.lr:g}); nothing was applied", f"parameters.{name}")

    def _provably_finite(self, param, grads, state, plan: "_Plan") -> bool:
        """Whether a bound on every value the update rule computes for this parameter stays far
        below the dtype's largest: then the dry run could only pass. The bounds use 2-norms (one
        BLAS pass each, at least the largest magnitude; a sum of parts is bounded by the sum of
        their norms); a NaN or infinity anywhere fails the test and leaves the verdict to the dry
        run."""
        config, c = self.config, plan.coefficients
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

    def _update_all(self, params, grad_parts, plan: "_Plan", update_ratios: dict | None,
                    products: dict | None = None) -> float:
        rule = getattr(self, f"_block_{self.config.name}")
        squared = 0.0
        sums = {}  # name -> [|old|^2, |new - old|^2]
        before = None
        shard_sq, shard_dot = [0.0] * len(grad_parts), [0.0] * len(grad_parts)
        for name, param, grad, state, scratch, part_blocks in self._blocks(params, grad_parts, parts=True):
            with np.errstate(over="ignore", invalid="ignore"):  # reported norms: huge gradients pass
                squared += float(np.dot(grad, grad))
                if products is not None:  # while the parts' blocks are in cache anyway
                    for index, block in enumerate(part_blocks):
                        shard_sq[index] += float(np.dot(block, block))
                        shard_dot[index] += float(np.dot(block, grad))
            if update_ratios is not None:
                if before is None or before.size < param.size or before.dtype != param.dtype:
                    before = np.empty(max(param.size, BLOCK_ELEMENTS), param.dtype)
                old = before[:param.size]
                np.copyto(old, param)
                totals = sums.setdefault(name, [0.0, 0.0])
                totals[0] += float(np.dot(old, old))
            rule(param, grad, state, scratch, plan.scale, plan.coefficients)
            if update_ratios is not None:
                np.subtract(param, old, out=old)
                totals[1] += float(np.dot(old, old))
        if update_ratios is not None:
            update_ratios.update({name: math.sqrt(change / weight) if weight > 0.0 else math.nan
                                  for name, (weight, change) in sums.items()})
        if products is not None:
            products.update(shard_sq=shard_sq, shard_dot=shard_dot, total_sq=squared)
        return squared

    def _blocks(self, params, grad_parts, *, parts: bool = False):
        """`(name, param block, summed gradient block, state blocks, scratch)` over every
        parameter in cache-sized blocks (with `parts`, each part's block too); the views are of
        the live arrays."""
        for name, param in params.items():
            flat_param = param.reshape(-1)
            if not np.shares_memory(flat_param, param):
                raise InvalidArgument("parameters must be contiguous to update in place",
                                      f"parameters.{name}")
            flat_grads = [np.ravel(part[name]) for part in grad_parts]
            flat_state = {slot: value.reshape(-1) for slot, value in self.state[name].items()}
            block = min(flat_param.size, BLOCK_ELEMENTS)
            scratch = (np.empty(block, flat_param.dtype), np.empty(block, flat_param.dtype))
            summed = None
            for start in range(0, flat_param.size, BLOCK_ELEMENTS):
                stop = start + BLOCK_ELEMENTS
                grad_block = _sum_block(flat_grads, start, stop, summed)
                if len(flat_grads) > 1:
                    summed = grad_block
                size = grad_block.size
                blocks = (name, flat_param[start:stop], grad_block,
                          {slot: value[start:stop] for slot, value in flat_state.items()},
                          (scratch[0][:size], scratch[1][:size]))
                yield (*blocks, [flat[start:stop] for flat in flat_grads]) if parts else blocks

    def _coefficients(self, lr: float, step: int) -> dict:
        config = self.config
        return {
            "lr": lr,
            "bias_correction1": 1.0 - config.beta1 ** step,
            "bias_correction2_sqrt": math.sqrt(1.0 - config.beta2 ** step),
        }

    # Each rule updates one block in place; `scratch` holds two block-sized buffers it may overwrite.
    # `grad` may be a read-only view of a worker's gradient, so it is never written. Momentum and
    # Adam state start at zero, which gives exactly torch's first step (0 * beta + g == g).

    def _scaled_grad(self, param, grad, scratch, scale, *, l2: bool):
        np.multiply(grad, scale, out=scratch)
        if l2 and self.config.weight_decay:
            scratch += self.config.weight_decay * param
        return scratch

    def _block_sgd(self, param, grad, state, scratch, scale, c):
        g = self._scaled_grad(param, grad, scratch[0], scale, l2=True)
        g *= -c["lr"]
        param += g

    def _block_momentum(self, param, grad, state, scratch, scale, c):
        g = self._scaled_grad(param, grad, scratch[0], scale, l2=True)
        buf = state["momentum_buffer"]
        buf *= self.config.momentum
        buf += g
        np.multiply(buf, -c["lr"], out=g)
        param += g

    def _block_nesterov(self, param, grad, state, scratch, scale, c):
        g = self._scaled_grad(param, grad, scratch[0], scale, l2=True)
        buf = state["momentum_buffer"]
        buf *= self.config.momentum
        buf += g
        np.multiply(buf, self.config.momentum, out=scratch[1])
        g += scratch[1]
        g *= -c["lr"]
        param += g

    def _block_adam(self, param, grad, state, scratch, scale, c):
        self._adam(param, grad, state, scratch, scale, c, l2=True)

    def _block_adamw(self, param, grad, state, scratch, scale, c):
        if self.config.weight_decay:
            param *= 1.0 - c["lr"] * self.config.weight_decay
        self._adam(param, grad, state, scratch, scale, c, l2=False)

    def _adam(self, param, grad, state, scratch, scale, c, *, l2: bool):
        config = self.config
        g = self._scaled_grad(param, grad, scratch[0], scale, l2=l2)
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

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """`(arrays, meta)`: arrays keyed `PARAM/SLOT`, meta JSON-able (config, update count)."""
        arrays = {f"{name}/{slot}": value for name, slots in self.state.items()
                  for slot, value in slots.items()}
        return arrays, {"config": self.config.to_dict(), "update_count": self.update_count}

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        """Restore from `state_dict()` output; the config in `meta` must name the same optimizer."""
        config = OptimizerConfig.from_dict(meta["config"])
        if config.name != self.config.name:
            raise InvalidArgument(f"state is for {config.name!r}, optimizer is {self.config.name!r}",
                                  "optimizer.name")
        for name, slots in self.state.items():
            for slot, value in slots.items():
                key = f"{name}/{slot}"
                if key not in arrays:
                    raise InvalidArgument("missing optimizer state", f"optimizer_state.{key}")
                stored = np.asarray(arrays[key])
                if stored.shape != value.shape:
                    raise InvalidArgument(f"shape {stored.shape} != {value.shape}",
                                          f"optimizer_state.{key}")
                value[...] = stored
        self.config = config
        self.update_count = int(meta["update_count"])
