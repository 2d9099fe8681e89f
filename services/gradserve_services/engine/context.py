"""What a single forward/backward pass over one micro-batch needs to know besides the data."""

from __future__ import annotations

from dataclasses import dataclass

from .masks import dropout_mask
from .workspace import Workspace

__all__ = ["PassContext"]


@dataclass(frozen=True)
class PassContext:
    xp: object
    dtype: object  # the parameter dtype; every buffer is in it
    workspace: Workspace
    train: bool
    seed: int
    first_sample: int  # global index of this micro-batch's first row (dropout masks depend on it)

    def buffer(self, owner: str, role: str, shape, dtype=None):
        return self.workspace.buffer(owner, role, shape, self.dtype if dtype is None else dtype)

    def filled(self, value: float, length: int):
        """A cached read-only vector of `length` copies of `value` in the pass dtype."""
        return self.workspace.filled(value, length, self.dtype)

    def dropout_mask(self, node_name: str, shape, rate: float):
        out = self.buffer(node_name, "mask", shape)
        return dropout_mask(self.xp, self.seed, node_name, self.first_sample, shape, rate, self.dtype, out)
