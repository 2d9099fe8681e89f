"""The optimizer: per-parameter state plus the update loop over cache-sized blocks.

The parameter server calls `Optimizer.step(params, grad_parts, grad_scale=...)` with the per-worker
gradient SUMS it received and `1 / total_count` as the scale, so the mean gradient is never
materialised: each parameter is walked once in cache-sized blocks that sum the parts, accumulate the
squared norm and update the parameter and its state in place (parallel.py splits the walk over
threads). With clipping the norm must be known before the first update, so that case makes one
extra read-only pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from gradserve_services.errors import InvalidArgument
from gradserve_services.optim.clipping import clip_scale, global_norm
from gradserve_services.optim.config import OptimizerConfig
from gradserve_services.optim.finite import check_update
from gradserve_services.optim.parallel import update_all
from gradserve_services.optim.rules import STATE_SLOTS, coefficients
from gradserve_services.optim.schedules import learning_rate

__all__ = ["Optimizer"]


@dataclass(frozen=True)
class _Plan:
    """What one update uses, fixed before it touches anything (so a dry run sees the same)."""

    lr: float
    clip_scale: float
    norm: float | None  # None: computed while updating (no clipping, no norm given)
    scale: float  # applied to the summed gradient: grad_scale times clip_scale
    coefficients: dict


class Optimizer:
    """Per-parameter optimizer state plus the update rule; updates parameter arrays in place."""

    def __init__(self, config: Mapping | OptimizerConfig, params: Mapping[str, np.ndarray]):
        self.config = OptimizerConfig.from_dict(config)
        self.update_count = 0
        self.state: dict[str, dict[str, np.ndarray]] = {
            name: {slot: np.zeros_like(value) for slot in STATE_SLOTS[self.config.name]}
            for name, value in params.items()
        }

    def step(self, params: Mapping[str, np.ndarray], grad_parts: Sequence[Mapping[str, np.ndarray]],
             *, grad_scale: float = 1.0, norm: float | None = None,
             update_ratios: dict | None = None, products: dict | None = None, idle_cores: bool = False) -> dict:
        """Apply one update with gradient `grad_scale * sum(grad_parts)` to `params` in place.

        `norm` is the global gradient norm when the caller knows it (a sharded parameter server
        computes it across shards); otherwise it is computed here. Returns
        `{"lr", "grad_norm", "clip_scale"}` for the step's report. An update that would leave a
        parameter or its state non-finite raises FailedPrecondition (see `check`) and changes
        nothing. A dict passed as `update_ratios` receives `|new - old| / |old|` per parameter,
        measured block by block while each block is in cache. `idle_cores`: the caller's workers
        wait for this update, so it may use more threads (`optim/parallel.py`; bitwise the same).
        """
        plan = self._plan(grad_parts, grad_scale, norm)
        check_update(self.config, params, grad_parts, self.state, plan)
        self.update_count += 1
        squared = self._update_all(params, grad_parts, plan, update_ratios, products, idle_cores)
        norm = plan.norm if plan.norm is not None else math.sqrt(squared) * grad_scale
        return {"lr": plan.lr, "grad_norm": float(norm), "clip_scale": plan.clip_scale}

    def check(self, params: Mapping[str, np.ndarray], grad_parts: Sequence[Mapping[str, np.ndarray]],
              *, grad_scale: float = 1.0, norm: float | None = None) -> None:
        """Raise FailedPrecondition if `step` with these arguments would make a gradient, a
        parameter or its optimizer state non-finite; changes nothing.

        A dry run of the same rules on copies of each block, so its verdict is exactly the
        update's: a sharded parameter server asks every shard before any applies. It costs about
        one more pass over the parameters, the price of never having to undo an update."""
        check_update(self.config, params, grad_parts, self.state,
                     self._plan(grad_parts, grad_scale, norm))

    def _plan(self, grad_parts, grad_scale: float, norm: float | None) -> _Plan:
        if not grad_parts:
            raise InvalidArgument("no gradient to apply", "gradients")
        clip_norm = self.config.clip_norm
        if norm is None and clip_norm is not None:
            norm = global_norm(grad_parts, grad_scale)
        scale_for_clip = clip_scale(norm, clip_norm)
        lr = learning_rate(self.config, self.update_count)
        # torch's `state["step"]` after its `+= 1`: this update's 1-based index
        return _Plan(lr, scale_for_clip, norm, grad_scale * scale_for_clip,
                     coefficients(self.config, lr, self.update_count + 1))

    def _update_all(self, params, grad_parts, plan: _Plan, update_ratios: dict | None,
                    products: dict | None = None, idle_cores: bool = False) -> float:
        return update_all(self.config, params, grad_parts, self.state, plan, update_ratios, products,
                          idle_cores=idle_cores)

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
