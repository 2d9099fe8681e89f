"""Global-norm clipping, as `torch.nn.utils.clip_grad_norm_` computes it."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from gradserve_services.optim.blocks import BLOCK_ELEMENTS, sum_block

__all__ = ["CLIP_EPSILON", "global_norm", "clip_scale"]

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); the same guard keeps trajectories equal.
CLIP_EPSILON = 1e-6


def global_norm(grad_parts: Sequence[Mapping[str, np.ndarray]], grad_scale: float = 1.0) -> float:
    """L2 norm over all parameters of `grad_scale * sum(grad_parts)` (float64 accumulation)."""
    return math.sqrt(_squared_norm(grad_parts, grad_scale))


def clip_scale(norm: float | None, clip_norm: float | None) -> float:
    """The factor clipping multiplies the gradient by (1.0 without clipping)."""
    if clip_norm is not None and norm + CLIP_EPSILON > 0:
        return min(1.0, clip_norm / (norm + CLIP_EPSILON))
    return 1.0


def _squared_norm(grad_parts, grad_scale: float) -> float:
    total = 0.0
    names = list(grad_parts[0]) if grad_parts else []
    scratch = None
    for name in names:
        flats = [np.ravel(part[name]) for part in grad_parts]
        for start in range(0, flats[0].size, BLOCK_ELEMENTS):
            stop = start + BLOCK_ELEMENTS
            block = sum_block(flats, start, stop, scratch)
            scratch = block if len(flats) > 1 else scratch
            total += float(np.dot(block, block))
    return total * grad_scale * grad_scale
