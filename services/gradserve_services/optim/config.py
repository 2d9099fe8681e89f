"""Optimizer and schedule configuration: the names the service knows and their validation.

Every other list of these names (the job file, the CLI reference) imports them from here; errors
name the field as `optimizer.FIELD`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping

import numpy as np

from gradserve_services.errors import InvalidArgument

__all__ = ["OPTIMIZER_NAMES", "SCHEDULE_NAMES", "ScheduleConfig", "OptimizerConfig",
           "check_fits_dtype", "Range", "OPTIMIZER_RANGES", "SCHEDULE_RANGES"]

OPTIMIZER_NAMES = ("sgd", "momentum", "nesterov", "adam", "adamw")
SCHEDULE_NAMES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class Range:
    """The values a numeric setting takes (None: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True


# Every numeric setting's range: the validation below and GetServerInfo both read these.
OPTIMIZER_RANGES = {
    "lr": Range(low=0.0, low_inclusive=False),
    "momentum": Range(low=0.0, high=1.0),
    "beta1": Range(low=0.0, high=1.0, high_inclusive=False),
    "beta2": Range(low=0.0, high=1.0, high_inclusive=False),
    "eps": Range(low=0.0),
    "weight_decay": Range(low=0.0),
    "clip_norm": Range(low=0.0, low_inclusive=False),  # or null: no clipping
}
SCHEDULE_RANGES = {
    "warmup_steps": Range(low=0),
    "step_size": Range(low=0),  # >= 1 for the step schedule
    "gamma": Range(low=0.0),
    "total_steps": Range(low=0),
    "min_lr": Range(low=0.0),
}
_INTEGER_SCHEDULE_SETTINGS = ("warmup_steps", "step_size", "total_steps")


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
        for name, allowed in OPTIMIZER_RANGES.items():
            value = getattr(self, name)
            if not (name == "clip_norm" and value is None):
                _check_number(value, f"optimizer.{name}", allowed)
        schedule = self.schedule
        if schedule.name not in SCHEDULE_NAMES:
            raise InvalidArgument(f"unknown schedule {schedule.name!r}; one of {SCHEDULE_NAMES}",
                                  "optimizer.schedule.name")
        for name in _INTEGER_SCHEDULE_SETTINGS:
            value = getattr(schedule, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"must be a non-negative integer, got {value!r}",
                                      f"optimizer.schedule.{name}")
        if schedule.name == "step" and schedule.step_size < 1:
            raise InvalidArgument("must be >= 1", "optimizer.schedule.step_size")
        for name, allowed in SCHEDULE_RANGES.items():
            if name not in _INTEGER_SCHEDULE_SETTINGS:
                _check_number(getattr(schedule, name), f"optimizer.schedule.{name}", allowed)


def _reject_unknown(config: Mapping, known: set, prefix: str) -> None:
    for key in config:
        if key not in known:
            raise InvalidArgument(f"unknown field {key!r}", f"{prefix}.{key}")


def _check_number(value, field_name: str, allowed: Range) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number, got {value!r}", field_name)
    low, high, low_inclusive, high_inclusive = (allowed.low, allowed.high, allowed.low_inclusive,
                                                allowed.high_inclusive)
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
