"""Parameter gradients summed over the micro-batches of one call.

The first micro-batch writes its contribution straight into the array returned to the caller; each
later one goes through a scratch buffer and is added with `+=`. So one micro-batch costs no extra
pass over the gradients, and several cost one add each. The sums come from `Workspace.result`:
they belong to the caller, and a later call never writes into one the caller still holds.
"""

from __future__ import annotations

__all__ = ["GradSums"]


class GradSums:
    def __init__(self, xp, shapes, dtype, workspace):
        self.xp, self.shapes, self.dtype, self.workspace = xp, shapes, dtype, workspace
        self.sums: dict[str, object] = {}

    def write(self, name: str, contribution) -> None:
        """`contribution(out)` writes this pass's gradient of `name` into `out`."""
        total = self.sums.get(name)
        if total is None:
            self.sums[name] = self.workspace.result(name, self.shapes[name], self.dtype)
            contribution(self.sums[name])
        else:
            scratch = self.workspace.buffer(name, "grad_contribution", self.shapes[name], self.dtype)
            contribution(scratch)
            total += scratch

    def result(self) -> dict[str, object]:
        """Every parameter in model order; one no pass reached (impossible for a valid graph) is 0."""
        return {
            name: self.sums[name] if name in self.sums else self.xp.zeros(shape, dtype=self.dtype)
            for name, shape in self.shapes.items()
        }
