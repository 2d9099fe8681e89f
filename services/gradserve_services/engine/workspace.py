"""Buffers reused across the passes of one Model.

A training step on a 4096-wide model touches hundreds of MB of activations, error signals and
gradients; allocating them afresh each step costs page faults. Two kinds of reuse:

- `buffer`: scratch for one pass (activations, error signals). One array per (owner, role,
  trailing shape, dtype); a smaller batch gets the first `rows` rows of it, so micro-batches and
  small batches reuse the memory of the largest batch seen. Valid until the next pass asks for the
  same key, and never returned to a caller.
- `result`: arrays handed to the caller (gradient sums). Returned arrays are the caller's: one is
  recycled only once nothing outside this pool refers to it any more (CPython reference count: a
  dropped result, no live view of it), so a later call never writes into an array the caller can
  still read. Up to `RESULT_POOL_DEPTH` per name are kept, enough for the usual loop in which the
  previous step's gradients are still alive during the next call.
"""

from __future__ import annotations

import sys

__all__ = ["Workspace", "RESULT_POOL_DEPTH"]

RESULT_POOL_DEPTH = 2


def _pool_only_refcount() -> int | None:
    """The reference count `result` sees for an array held by nothing but its pool list, measured
    with the very loop `result` uses (the number differs between Python versions)."""
    if not hasattr(sys, "getrefcount"):
        return None  # not CPython: never recycle
    pool = [object()]
    for candidate in pool:
        return sys.getrefcount(candidate)
    return None


POOL_ONLY_REFCOUNT = _pool_only_refcount()


class Workspace:
    def __init__(self, xp):
        self.xp = xp
        self._buffers: dict[tuple, object] = {}
        self._results: dict[tuple, list] = {}
        self._filled: dict[tuple, object] = {}

    def buffer(self, owner: str, role: str, shape: tuple[int, ...], dtype):
        rows, trailing = shape[0], tuple(shape[1:])
        key = (owner, role, trailing, dtype)
        array = self._buffers.get(key)
        if array is None or array.shape[0] < rows:
            array = self._buffers[key] = self.xp.empty((rows, *trailing), dtype=dtype)
        return array if array.shape[0] == rows else array[:rows]

    def filled(self, value: float, length: int, dtype):
        """A read-only vector of `length` copies of `value`, kept for reuse. Operands for ufuncs
        and BLAS: `maximum(z, zeros_row)` runs several times faster than `maximum(z, 0)` in numpy
        (the broadcast scalar misses the vectorised loop), and `ones @ g` sums rows via BLAS."""
        key = (value, length, self.xp.dtype(dtype))
        array = self._filled.get(key)
        if array is None:
            array = self._filled[key] = self.xp.full((length,), value, dtype=dtype)
        return array

    def result(self, name: str, shape: tuple[int, ...], dtype):
        """An uninitialised array the caller will own (see the module docstring)."""
        pool = self._results.setdefault((name, tuple(shape), self.xp.dtype(dtype)), [])
        if POOL_ONLY_REFCOUNT is not None:
            for candidate in pool:
                if sys.getrefcount(candidate) <= POOL_ONLY_REFCOUNT:
                    return candidate
        array = self.xp.empty(shape, dtype=dtype)
        if len(pool) < RESULT_POOL_DEPTH:
            pool.append(array)
        return array

    def release(self) -> None:
        """Drop every buffer and pooled result (arrays a caller still holds stay valid)."""
        self._buffers.clear()
        self._results.clear()
        self._filled.clear()

    @property
    def nbytes(self) -> int:
        pooled = sum(array.nbytes for pool in self._results.values() for array in pool)
        return pooled + sum(array.nbytes for array in self._buffers.values())
