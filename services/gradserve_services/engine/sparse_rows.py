"""Some rows of a table: sorted unique ids and one row each. A table's gradient comes out this way.

A batch reads a few thousand rows of a table of millions, so its gradient is kept as the rows it
touched: `ids` (int64, sorted, unique) and `rows` (len(ids), dim), the table's full `shape` beside
them. Fan-out applies per id: an id looked up k times receives the SUM of its k row gradients
(`from_lookups`). The same class holds rows pulled from a table, and the engine reads a table given
this way as if it were whole, as long as every id the batch looks up is among its rows.
"""

from __future__ import annotations

import numbers

from gradserve_services.errors import InvalidArgument

__all__ = ["SparseRows", "gather_rows", "row_positions", "dense_gradients"]


class SparseRows:
    def __init__(self, ids, rows, shape):
        self.ids, self.rows, self.shape = ids, rows, tuple(int(extent) for extent in shape)

    @classmethod
    def from_lookups(cls, xp, ids, rows, shape) -> SparseRows:
        """One row per distinct id: the sum of the `rows` looked up under it. A stable sort keeps
        the summation order fixed, so equal inputs give bit-equal sums."""
        ids = xp.asarray(ids, dtype=xp.int64).reshape(-1)
        if ids.shape[0] == 0:
            return cls.empty(xp, shape, rows.dtype)
        order = xp.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = xp.flatnonzero(xp.concatenate([xp.ones(1, dtype=bool), sorted_ids[1:] != sorted_ids[:-1]]))
        return cls(sorted_ids[starts], xp.add.reduceat(rows[order], starts, axis=0), shape)

    @classmethod
    def from_positions(cls, xp, ids, positions, rows, shape) -> SparseRows:
        """`from_lookups(ids[positions], rows)` for sorted unique `ids` (a `SparseRows`' own): the
        same rows in the same order, so bit-equal sums, without sorting the ids. The positions
        are small (< len(ids)): as 16-bit keys numpy's stable sort is a linear radix sort."""
        if positions.shape[0] == 0:
            return cls.empty(xp, shape, rows.dtype)
        keys = positions.astype(xp.uint16) if ids.shape[0] <= 1 << 16 else positions
        order = xp.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        first = xp.empty(sorted_keys.shape[0], dtype=bool)
        first[0] = True
        xp.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
        starts = xp.flatnonzero(first)
        return cls(ids[sorted_keys[starts]], xp.add.reduceat(xp.take(rows, order, axis=0), starts, axis=0), shape)

    @classmethod
    def empty(cls, xp, shape, dtype) -> SparseRows:
        return cls(xp.zeros(0, dtype=xp.int64), xp.zeros((0, shape[1]), dtype=dtype), shape)

    @classmethod
    def combine(cls, xp, parts) -> SparseRows:
        """The sum of several sets of rows of one table: ids in any of them, rows added."""
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        ids = xp.concatenate([part.ids for part in parts])
        rows = xp.concatenate([part.rows for part in parts])
        return cls.from_lookups(xp, ids, rows, parts[0].shape)

    @property
    def dtype(self):
        return self.rows.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the ids and rows (what moving these rows costs, never the table's)."""
        return int(self.ids.nbytes + self.rows.nbytes)

    @property
    def xp(self):
        """The array namespace the rows live in (numpy, cupy, ...)."""
        return self.rows.__array_namespace__()

    def dense(self):
        """The whole table: these rows in place, zeros elsewhere."""
        table = self.xp.zeros(self.shape, dtype=self.rows.dtype)
        table[self.ids] = self.rows
        return table

    def __add__(self, other):
        if isinstance(other, SparseRows):
            if other.shape != self.shape:
                raise ValueError(f"rows of a {self.shape} table added to rows of a {other.shape} table")
            return SparseRows.combine(self.xp, [self, other])
        if isinstance(other, (int, float)) and other == 0:  # sum() starts from 0
            return self
        return NotImplemented

    __radd__ = __add__

    def __mul__(self, factor):
        if isinstance(factor, numbers.Real):
            return SparseRows(self.ids, self.rows * self.rows.dtype.type(factor), self.shape)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, divisor):
        if isinstance(divisor, numbers.Real):
            return SparseRows(self.ids, self.rows / self.rows.dtype.type(divisor), self.shape)
        return NotImplemented

    def __repr__(self) -> str:
        return f"SparseRows({len(self.ids)} of {self.shape[0]} rows, dim {self.shape[1]}, {self.rows.dtype})"


def gather_rows(xp, table, ids, field: str):
    """table[ids] for a whole table (an array) or for `SparseRows`, whose ids must include every
    looked-up id (else InvalidArgument naming `field`)."""
    if not isinstance(table, SparseRows):
        return xp.take(table, ids, axis=0)
    return xp.take(table.rows, row_positions(xp, table, ids, field), axis=0)


def row_positions(xp, table: SparseRows, ids, field: str, scratch=None):
    """Where each of `ids` is among `table.ids` (InvalidArgument naming `field` if one is not).

    `scratch`, an int32 array of one slot per table row (any contents), turns the search into two
    gathers: slot id := its position, then read the slots of `ids`. A binary search mispredicts
    a branch at nearly every level on unsorted ids (several times slower on a batch's lookups); a
    slot another call left behind is harmless, since every position is checked against the id."""
    last = max(len(table.ids) - 1, 0)
    if scratch is None:
        positions = xp.searchsorted(table.ids, ids)
        xp.minimum(positions, last, out=positions)
    else:
        scratch[table.ids] = xp.arange(table.ids.shape[0], dtype=scratch.dtype)
        positions = xp.take(scratch, ids, mode="clip")
        xp.clip(positions, 0, last, out=positions)
    found = xp.take(table.ids, positions) == ids if len(table.ids) else xp.zeros(ids.shape, dtype=bool)
    if not bool(found.all()):
        missing = int(ids[~found][0])
        raise InvalidArgument(f"row {missing} is looked up by the batch but not among the rows given", field=field)
    return positions


def dense_gradients(grads) -> dict:
    """The gradients with every table's `SparseRows` made whole (for callers that want arrays)."""
    return {name: grad.dense() if isinstance(grad, SparseRows) else grad for name, grad in grads.items()}

