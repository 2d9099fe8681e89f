"""`RowStore`: the rows of a trainer's tables of one width on one parameter-server shard,
materialised lazily, in one record array.

A table of millions of rows starts as a function, not an array: row r of table T is
`table_rows(seed, T, r)` (engine/table_init.py), the very value `Model.init_parameters` gives it.
A row read before any update is computed on the spot and not kept; a row becomes stored (its value
and its optimizer state) the first time an update reaches it. Memory is therefore what the steps
touched: a 4-byte slot per row of the shard (a zero-filled array, whose untouched pages the kernel
never backs), plus the touched rows' records in an array that doubles when full. A record is the
row's value and its state slots side by side (`[value | slot 0 | slot 1]`).

Every table of one width shares the store: a row is addressed by a key, its table's offset plus
its local row (`r // S` for row r on shard `r mod S`, row_placement.py), so a step's update of all
26 tables of a DLRM is one gather, one optimizer pass and one scatter, not 26 of each. Keys sort
table by table, so the table of a key is found by its offset.

An update is planned first (`plan`: new values and state of the rows, nothing written), refused
whole when anything in it is not finite (naming the table), and written only by `write`, so a
sharded server can ask every shard before any applies.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from gradserve_services.engine import table_rows
from gradserve_services.errors import FailedPrecondition
from gradserve_services.optim import all_finite
from gradserve_services.optim.rows import RowOptimizer

from .row_placement import RowPlacement

__all__ = ["RowStore"]

INITIAL_CAPACITY = 1024


class RowStore:
    def __init__(self, tables: Mapping[str, int], dim: int, dtype, seed: int, shard: int,
                 placement: RowPlacement, optimizer: RowOptimizer):
        """`tables`: rows of each table (all of width `dim`)."""
        self.rows_of = {name: int(rows) for name, rows in tables.items()}
        self.dim, self.dtype = int(dim), np.dtype(dtype)
        self.seed, self.shard, self.placement, self.optimizer = int(seed), shard, placement, optimizer
        self.updates = 0  # updates applied to these tables (the optimizer's step counter)
        sizes = [placement.shard_rows(rows, shard) for rows in self.rows_of.values()]
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._offset = dict(zip(self.rows_of, (int(start) for start in starts[:-1])))
        self._starts = starts[:-1]
        self._names = list(self.rows_of)
        self._slot_of = np.zeros(int(starts[-1]), dtype=np.int32)  # 0: never updated, else slot + 1
        self._count = 0
        self._keys = np.empty(0, dtype=np.int64)  # key of each slot
        self._slots = optimizer.config.slots
        self._records = np.empty((0, self.dim * (1 + len(self._slots))), dtype=self.dtype)

    # ----- keys ----------------------------------------------------------------------------------

    def keys(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Keys of rows `ids` (global, this shard's) of table `name`."""
        return self._offset[name] + self.placement.local(ids.astype(np.int64, copy=False))

    def _tables_of(self, keys: np.ndarray) -> np.ndarray:
        """Index into the tables of each key."""
        return np.searchsorted(self._starts, keys, side="right") - 1

    # ----- reading -------------------------------------------------------------------------------

    @property
    def stored_rows(self) -> int:
        return self._count

    @property
    def key_count(self) -> int:
        """Rows of every table of this store on this shard: the key space."""
        return int(self._slot_of.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held on the shard: the slot index and the stored rows' records."""
        return self._slot_of.nbytes + (self._records.shape[1] * self.dtype.itemsize + 8) * self._count

    def gather(self, keys: np.ndarray, width: int) -> np.ndarray:
        """The first `width` columns of the records of `keys`: stored, or initial (value from the
        seed, state as the optimizer starts it)."""
        slots = self._slot_of[keys].astype(np.int64) - 1
        stored = slots >= 0
        if bool(stored.all()):
            return self._stored_records(slots, width)
        out = np.empty((keys.shape[0], width), dtype=self.dtype)
        out[stored] = self._stored_records(slots[stored], width)
        fresh = np.flatnonzero(~stored)
        tables = self._tables_of(keys[fresh])
        for index in np.unique(tables):
            name = self._names[index]
            positions = fresh[tables == index]
            ids = self.placement.global_ids(keys[positions] - self._offset[name], self.shard)
            out[positions, :self.dim] = table_rows(np, self.seed, name, ids, (self.rows_of[name], self.dim),
                                                   self.dtype)
        if width > self.dim:
            start = self.optimizer.initial_state(1, self.dim, self.dtype)
            out[fresh, self.dim:] = np.concatenate([start[slot] for slot in self._slots], axis=1)
        return out

    def _stored_records(self, slots: np.ndarray, width: int) -> np.ndarray:
        """The first `width` columns of the records in `slots`. Never `np.take` of a column slice:
        take makes its (strided) source contiguous first, a copy of every stored record (a loaded
        table's millions) per call; an index of rows and columns reads the rows asked only."""
        if width == self._records.shape[1]:
            return np.take(self._records, slots, axis=0)
        return self._records[slots, :width]

    def read(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (global, this shard's) of table `name`, stored or initial."""
        return self.gather(self.keys(name, ids), self.dim)

    def read_state(self, name: str, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self._split(self.gather(self.keys(name, ids), self._records.shape[1]))[1]

    def _split(self, records: np.ndarray):
        """`(values, {slot: state})` views of records."""
        dim = self.dim
        return records[:, :dim], {slot: records[:, dim * (k + 1):dim * (k + 2)] for k, slot in enumerate(self._slots)}

    def dense(self, name: str) -> np.ndarray:
        """Every row this shard holds of table `name`, in local order (row `local * S + shard`)."""
        local = np.arange(self.placement.shard_rows(self.rows_of[name], self.shard), dtype=np.int64)
        return self.gather(self._offset[name] + local, self.dim)

    # ----- updating ------------------------------------------------------------------------------

    def plan(self, keys: np.ndarray, grad: np.ndarray):
        """`(new_rows, new_state)` of the update with mean gradient rows `grad` of the sorted
        unique `keys`; writes nothing. FailedPrecondition naming the table if the gradient or the
        result is not finite."""
        if not all_finite(grad):
            raise FailedPrecondition(f"the gradient of {self._name_of_bad(keys, grad)!r} is not finite "
                                     "(the model overflows on this batch); nothing was applied",
                                     f"gradients.{self._name_of_bad(keys, grad)}")
        records = self.gather(keys, self._records.shape[1])
        # contiguous copies: the rule's passes then run over flat arrays, not 16-wide strided rows
        rows, state = self._split(records)
        rows, state = np.ascontiguousarray(rows), {slot: np.ascontiguousarray(part) for slot, part in state.items()}
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is the finding
            new_rows, new_state = self.optimizer.update(rows, state, grad, self.updates + 1)
        new = np.concatenate([new_rows, *(new_state[slot] for slot in self._slots)], axis=1) \
            if self._slots else new_rows
        if not all_finite(new):
            name = self._name_of_bad(keys, new)
            raise FailedPrecondition(f"the update would make rows of {name!r} not finite; nothing "
                                     "was applied", f"parameters.{name}")
        return new

    def _name_of_bad(self, keys: np.ndarray, values: np.ndarray) -> str:
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        return self._names[int(self._tables_of(keys[bad[:1]])[0])] if bad.size else self._names[0]

    def write(self, keys: np.ndarray, records: np.ndarray) -> None:
        """Store planned records (and count the update, empty or not, as torch counts its steps)."""
        slots = self._slots_for(keys)  # first: it may grow the records
        self._records[slots] = records
        self.updates += 1

    def _slots_for(self, keys: np.ndarray) -> np.ndarray:
        """Slots of `keys`, new rows given the next free ones."""
        slots = self._slot_of[keys].astype(np.int64) - 1
        fresh = slots < 0
        added = int(fresh.sum())
        if added:
            self._reserve(self._count + added)
            new_slots = np.arange(self._count, self._count + added, dtype=np.int64)
            slots[fresh] = new_slots
            self._slot_of[keys[fresh]] = (new_slots + 1).astype(np.int32)
            self._keys[new_slots] = keys[fresh]
            self._count += added
        return slots

    def _reserve(self, needed: int) -> None:
        capacity = self._keys.shape[0]
        if needed <= capacity:
            return
        capacity = max(INITIAL_CAPACITY, capacity)
        while capacity < needed:
            capacity *= 2
        self._keys = _grown(self._keys, capacity, self._count)
        self._records = _grown(self._records, capacity, self._count)

    # ----- checkpoints ---------------------------------------------------------------------------

    def state(self, name: str) -> dict[str, np.ndarray]:
        """The stored rows of table `name` (rows never updated are their initial values, not saved)."""
        keys = self._keys[:self._count]
        start = self._offset[name]
        mine = np.flatnonzero((keys >= start) & (keys < start + self.placement.shard_rows(self.rows_of[name], self.shard)))
        values, state = self._split(self._records[mine])
        arrays = {"ids": self.placement.global_ids(keys[mine] - start, self.shard), "rows": values}
        arrays.update({f"state/{slot}": values for slot, values in state.items()})
        return arrays

    def load(self, name: str, ids: np.ndarray, rows: np.ndarray, state: dict) -> None:
        """Store `rows` (and their optimizer `state`) for `ids` of table `name`, as `state()` gave them."""
        keys = self.keys(name, ids)
        records = np.concatenate([rows, *(state[slot] for slot in self._slots)], axis=1) if self._slots else rows
        slots = self._slots_for(keys)  # first: it may grow the records
        self._records[slots] = records


def _grown(array: np.ndarray, capacity: int, used: int) -> np.ndarray:
    grown = np.empty((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[:used] = array[:used]
    return grown
