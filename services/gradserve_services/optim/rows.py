"""Per-row optimizers for tables (beside the dense rules): SGD, Adagrad and lazy Adam (torch's `SparseAdam`).

A table's gradient is a few rows of millions, so its update touches those rows only: the rule
takes the rows' current values and state slots and returns new ones, and state is kept (and
changed) only for rows a gradient reached — lazy Adam's moments of a row not in this step's
batch are not decayed, exactly as `torch.optim.SparseAdam` leaves them. The rules are pure
functions of the rows handed in, so a parameter server can dry-run an update (is it finite?)
and write it only when every shard agreed.

Operation order follows torch (`torch/optim/adagrad.py` sparse branch, `_functional.sparse_adam`),
so float32 trajectories match it to rounding. The step counter is one per table (torch: one per
parameter), counting the updates applied; the learning rate is constant (the dense schedule and
global-norm clipping cover the dense parameters only, as torch's sparse optimizers take neither).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from gradserve_services.errors import InvalidArgument

__all__ = ["TABLE_OPTIMIZER_NAMES", "TableOptimizerConfig", "RowOptimizer", "default_table_optimizer"]

TABLE_OPTIMIZER_NAMES = ("sgd", "adagrad", "sparse_adam")
_STATE_SLOTS = {"sgd": (), "adagrad": ("sum",), "sparse_adam": ("exp_avg", "exp_avg_sq")}
_DEFAULT_EPS = {"sgd": 0.0, "adagrad": 1e-10, "sparse_adam": 1e-8}  # torch's defaults


@dataclass(frozen=True)
class TableOptimizerConfig:
    name: str = "sparse_adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float | None = None  # None: torch's default for the optimizer
    initial_accumulator_value: float = 0.0  # adagrad

    @classmethod
    def from_dict(cls, config) -> "TableOptimizerConfig":
        """Validate a JSON-able dict; errors name `table_optimizer.FIELD`."""
        if isinstance(config, TableOptimizerConfig):
            return config
        config = dict(config or {})
        known = {name for name in cls.__dataclass_fields__}
        for key in config:
            if key not in known:
                raise InvalidArgument(f"unknown field {key!r}", f"table_optimizer.{key}")
        parsed = cls(**config)
        parsed._validate()
        return parsed

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def epsilon(self) -> float:
        return _DEFAULT_EPS[self.name] if self.eps is None else float(self.eps)

    @property
    def slots(self) -> tuple[str, ...]:
        return _STATE_SLOTS[self.name]

    def _validate(self) -> None:
        if self.name not in TABLE_OPTIMIZER_NAMES:
            raise InvalidArgument(f"unknown table optimizer {self.name!r}; one of {TABLE_OPTIMIZER_NAMES}",
                                  "table_optimizer.name")
        _number(self.lr, "lr", low=0.0, low_open=True)
        _number(self.beta1, "beta1", low=0.0, high=1.0)
        _number(self.beta2, "beta2", low=0.0, high=1.0)
        if self.eps is not None:
            _number(self.eps, "eps", low=0.0)
        _number(self.initial_accumulator_value, "initial_accumulator_value", low=0.0)


def _number(value, name: str, *, low=None, high=None, low_open=False) -> None:
    field = f"table_optimizer.{name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number, got {value!r}", field)
    if low is not None and (value < low or (low_open and value == low)):
        raise InvalidArgument(f"must be {'>' if low_open else '>='} {low}, got {value}", field)
    if high is not None and value >= high:
        raise InvalidArgument(f"must be < {high}, got {value}", field)


def default_table_optimizer(dense: Mapping) -> TableOptimizerConfig:
    """What tables get when a session names no table optimizer: lazy Adam with the dense
    optimizer's rate and moments for adam/adamw, plain SGD at its rate otherwise (momentum has
    no lazy form in torch)."""
    name = dense.get("name", "sgd")
    if name in ("adam", "adamw"):
        return TableOptimizerConfig("sparse_adam", dense.get("lr", 1e-3), dense.get("beta1", 0.9),
                                    dense.get("beta2", 0.999), dense.get("eps", 1e-8))
    return TableOptimizerConfig("sgd", dense.get("lr", 0.1))


class RowOptimizer:
    """One table's rule. `update(rows, state, grad, step)` returns `(new_rows, new_state)` for the
    rows `grad` (mean gradient rows, one per id) belongs to; `step` is the 1-based update index."""

    def __init__(self, config):
        self.config = TableOptimizerConfig.from_dict(config)

    def initial_state(self, count: int, dim: int, dtype) -> dict[str, np.ndarray]:
        """State of rows never updated: zeros (Adagrad: its initial accumulator)."""
        fill = self.config.initial_accumulator_value if self.config.name == "adagrad" else 0.0
        return {slot: np.full((count, dim), fill, dtype=dtype) for slot in self.config.slots}

    def update(self, rows: np.ndarray, state: Mapping[str, np.ndarray], grad: np.ndarray, step: int):
        """New rows and state; may overwrite `rows` and `state` (the caller's gathered copies),
        never `grad`. In place where it can: a step's rows are tens of thousands."""
        return getattr(self, f"_{self.config.name}")(rows, state, grad, step)

    def _sgd(self, rows, state, grad, step):
        # torch SGD, sparse gradient: param.add_(grad, alpha=-lr)
        rows -= grad * rows.dtype.type(self.config.lr)
        return rows, {}

    def _adagrad(self, rows, state, grad, step):
        config, dtype = self.config, rows.dtype.type
        total = state["sum"]
        total += grad * grad  # state_sum.add_(grad_values.pow(2))
        std = np.sqrt(total)
        std += dtype(config.epsilon)  # std_values.sqrt_().add_(eps)
        np.divide(grad, std, out=std)
        std *= dtype(config.lr)
        rows -= std  # param.add_(grad / std, alpha=-clr); lr_decay 0: clr = lr
        return rows, {"sum": total}

    def _sparse_adam(self, rows, state, grad, step):
        config, dtype = self.config, rows.dtype.type
        old_avg, old_sq = state["exp_avg"], state["exp_avg_sq"]
        numer = grad - old_avg
        numer *= dtype(1 - config.beta1)  # exp_avg_update_values
        numer += old_avg  # the new exp_avg
        second = grad * grad
        second -= old_sq
        second *= dtype(1 - config.beta2)  # exp_avg_sq_update_values
        second += old_sq  # the new exp_avg_sq
        denom = np.sqrt(second)
        denom += dtype(config.epsilon)
        step_size = config.lr * math.sqrt(1 - config.beta2 ** step) / (1 - config.beta1 ** step)
        np.divide(numer, denom, out=denom)
        denom *= -step_size
        rows += denom
        return rows, {"exp_avg": numer, "exp_avg_sq": second}
