"""Gradient signals a sync step yields almost for free: the simple gradient noise scale, the cosine
between each shard's gradient and the aggregate, the update-to-weight ratio per parameter, and
which worker was slow.

Noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A.1).
For a batch of b samples E|G_b|^2 = |G|^2 + tr(Sigma) / b. Each shard i (b_i samples) and the
aggregate (B samples) give two sizes, so per step

    |G|^2   ~ (B |G_B|^2 - b_i |G_b_i|^2) / (B - b_i)
    S       ~ (|G_b_i|^2 - |G_B|^2) / (1 / b_i - 1 / B)          (S estimates tr(Sigma))

both unbiased, averaged over the shards. One step's estimates are noisy (either may be negative),
so, as the paper recommends, S and |G|^2 are smoothed separately by an exponential moving average
over steps and B_simple = EMA(S) / EMA(|G|^2).

The parameter server reads the shards' gradient sums anyway: the optimizer measures the products
in its update loop while each block is in cache (`Optimizer.step(products=...)`: per block two dots
per shard and the sum's own). With several server shards the products of each parameter slice add
up (`add_products`).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


__all__ = ["ShardProducts", "add_products", "noise_terms", "NoiseScale",
           "shard_cosines", "compute_spread", "slowest_position", "NOISE_SCALE_DECAY"]

# EMA decay of the noise-scale terms: about 1 / (1 - decay) = 20 steps of memory.
NOISE_SCALE_DECAY = 0.95


class ShardProducts(dict):
    """`{"shard_sq": [|s_i|^2], "shard_dot": [s_i . sum_j s_j], "total_sq": |sum_j s_j|^2}` of the
    shards' gradient SUMS s_i (float64 accumulation), JSON-able."""


def add_products(products: Sequence[Mapping]) -> ShardProducts:
    """The products over all parameters from those of disjoint parameter slices (server shards)."""
    first = products[0]
    return ShardProducts(
        shard_sq=[sum(p["shard_sq"][i] for p in products) for i in range(len(first["shard_sq"]))],
        shard_dot=[sum(p["shard_dot"][i] for p in products) for i in range(len(first["shard_dot"]))],
        total_sq=sum(p["total_sq"] for p in products))


def noise_terms(products: Mapping, shard_counts: Sequence[int]) -> tuple[float, float] | None:
    """`(S, |G|^2)` estimated from one step's products and the shards' sample counts; None when the
    step has fewer than two non-empty shards (one batch size only: nothing to compare)."""
    total = sum(shard_counts)
    big_sq = products["total_sq"] / total ** 2
    estimates = [((sq / b ** 2 - big_sq) / (1.0 / b - 1.0 / total),
                  (total * big_sq - sq / b) / (total - b))
                 for sq, b in zip(products["shard_sq"], shard_counts) if 0 < b < total]
    if len(estimates) < 2:
        return None
    trace = sum(e[0] for e in estimates) / len(estimates)
    squared = sum(e[1] for e in estimates) / len(estimates)
    if not (math.isfinite(trace) and math.isfinite(squared)):
        return None
    return trace, squared


class NoiseScale:
    """B_simple = EMA(S) / EMA(|G|^2), the averages bias-corrected as Adam's moments are (so the
    first steps are not pulled toward zero)."""

    def __init__(self, decay: float = NOISE_SCALE_DECAY):
        self.decay = decay
        self.trace = self.squared = 0.0
        self.steps = 0

    def update(self, terms: tuple[float, float] | None) -> float:
        """Fold in one step's `(S, |G|^2)` (None: nothing new); the current B_simple, or NaN while
        it is undefined (no estimate yet, or a smoothed |G|^2 not above zero)."""
        if terms is not None:
            self.trace = self.decay * self.trace + (1.0 - self.decay) * terms[0]
            self.squared = self.decay * self.squared + (1.0 - self.decay) * terms[1]
            self.steps += 1
        return self.value

    @property
    def value(self) -> float:
        if self.steps == 0 or self.squared <= 0.0:
            return math.nan
        return self.trace / self.squared  # the bias corrections of numerator and denominator cancel

    def state(self) -> dict:
        return {"trace": self.trace, "squared": self.squared, "steps": self.steps}

    def load(self, state: Mapping | None) -> None:
        if state:
            self.trace, self.squared = float(state["trace"]), float(state["squared"])
            self.steps = int(state["steps"])


def shard_cosines(products: Mapping) -> tuple[float, ...]:
    """Cosine between each shard's gradient and the aggregate (scale-free, so sums serve as
    means); NaN for a zero gradient."""
    total = math.sqrt(products["total_sq"])
    return tuple(dot / (math.sqrt(sq) * total) if sq > 0.0 and total > 0.0 else math.nan
                 for sq, dot in zip(products["shard_sq"], products["shard_dot"]))


def compute_spread(compute_ms: Sequence[float]) -> float:
    """max / median of the workers' compute times: 1.0 when they are even; NaN with none."""
    if not compute_ms:
        return math.nan
    median = float(np.median(compute_ms))
    return max(compute_ms) / median if median > 0.0 else math.nan


def slowest_position(positions: Sequence[int], compute_ms: Sequence[float]) -> int:
    """Pool position of the worker with the longest compute time (-1 with none)."""
    if not compute_ms:
        return -1
    return int(positions[int(np.argmax(compute_ms))])
