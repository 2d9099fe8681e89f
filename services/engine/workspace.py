"""Scratch buffers reused across the passes of one Model.

A training step on a 4096-wide model touches hundreds of MB of activations and error signals;
allocating them afresh each step costs page faults and cache misses. A `Workspace` keeps one array
per (node, role, trailing shape, dtype) and hands out its first `rows` rows, so micro-batches and
smaller batches reuse the memory of the largest batch seen. A buffer is valid until the next pass
asks for the same key: nothing from here is ever returned to a caller (results are copies or
arrays the caller owns, see `grad_sums.py`).
"""

from __future__ import annotations

__all__ = ["Workspace"]


class Workspace:
    def __init__(self, xp):
        self.xp = xp
        self._arrays: dict[tuple, object] = {}

    def buffer(self, owner: str, role: str, shape: tuple[int, ...], dtype):
        rows, trailing = shape[0], tuple(shape[1:])
        key = (owner, role, trailing, self.xp.dtype(dtype))
        array = self._arrays.get(key)
        if array is None or array.shape[0] < rows:
            array = self._arrays[key] = self.xp.empty((rows, *trailing), dtype=dtype)
        return array if array.shape[0] == rows else array[:rows]

    def clear(self) -> None:
        self._arrays.clear()

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self._arrays.values())
