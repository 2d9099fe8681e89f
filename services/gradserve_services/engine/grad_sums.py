"""Parameter gradients summed over the micro-batches of one call.

The first micro-batch writes its contribution straight into the array returned to the caller; each
later one goes through a scratch buffer and is added with `+=`. So one micro-batch costs no extra
pass over the gradients, and several cost one add each. The sums come from `Workspace.result`:
they belong to the caller, and a later call never writes into one the caller still holds; or,
where the caller gives arrays of its own (`out`: a block another process reads them from), they
are summed there, with the same operations.

A table's gradient is rows, not an array: each micro-batch's lookups are summed per id at once
(bounding memory by the micro-batch), and the micro-batches' rows are summed over the union of
their ids at the end.
"""

from __future__ import annotations

from .sparse_rows import SparseRows

__all__ = ["GradSums"]


class GradSums:
    def __init__(self, xp, shapes, dtype, workspace, tables=(), out=None):
        self.xp, self.shapes, self.dtype, self.workspace = xp, shapes, dtype, workspace
        self.tables = frozenset(tables)
        self.out = out or {}  # {name: array of the parameter's shape and the pass dtype}
        self.sums: dict[str, object] = {}
        self.row_sums: dict[str, list[SparseRows]] = {}

    def write(self, name: str, contribution) -> None:
        """`contribution(out)` writes this pass's gradient of `name` into `out`."""
        total = self.sums.get(name)
        if total is None:
            given = self.out.get(name)
            self.sums[name] = self.workspace.result(name, self.shapes[name], self.dtype) if given is None else given
            contribution(self.sums[name])
        else:
            scratch = self.workspace.buffer(name, "grad_contribution", self.shapes[name], self.dtype)
            contribution(scratch)
            total += scratch

    def add_rows(self, name: str, ids, rows) -> None:
        """Table `name`'s gradient from this pass: `rows[i]` belongs to row `ids[i]` (ids repeat)."""
        self.row_sums.setdefault(name, []).append(SparseRows.from_lookups(self.xp, ids, rows, self.shapes[name]))

    def add_row_sums(self, name: str, sums: SparseRows) -> None:
        """Table `name`'s gradient from this pass, already summed per id."""
        self.row_sums.setdefault(name, []).append(sums)

    def result(self) -> dict[str, object]:
        """Every parameter in model order; one no pass reached (impossible for a valid graph) is 0."""
        return {name: self._total(name, shape) for name, shape in self.shapes.items()}

    def _total(self, name: str, shape):
        if name in self.tables:
            parts = self.row_sums.get(name)
            return SparseRows.combine(self.xp, parts) if parts else SparseRows.empty(self.xp, shape, self.dtype)
        return self.sums[name] if name in self.sums else self.xp.zeros(shape, dtype=self.dtype)
