"""Whether every element of an array is finite, without a temporary the size of the array.

`isfinite(a).all()` writes a boolean array as large as `a` (100 MB for a 100M-parameter model,
in freshly faulted pages) and reads it again. A sum reads `a` once and keeps nothing: NaN and
infinity propagate through it, so a finite sum proves every element finite. A non-finite sum is
either a non-finite element or an overflow of finite ones (float32 values near 3e38 add up past
it), so only then are the elements checked one block at a time.
"""

from __future__ import annotations

import math

import numpy

__all__ = ["all_finite"]

BLOCK_ELEMENTS = 1 << 20


def all_finite(xp, array) -> bool:
    with numpy.errstate(over="ignore", invalid="ignore"):  # an overflow is an answer here
        if math.isfinite(float(xp.sum(array))):
            return True
    flat = array.reshape(-1)
    return all(bool(xp.isfinite(flat[start:start + BLOCK_ELEMENTS]).all())
               for start in range(0, flat.shape[0], BLOCK_ELEMENTS))
