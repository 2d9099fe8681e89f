"""`RowStore`: one table's rows on one parameter-server shard, materialised lazily.

A table of millions of rows starts as a function, not an array: row r of table T is
`table_rows(seed, T, r)` (engine/table_init.py), the very value `Model.init_parameters` gives it.
A row read before any update is computed on the spot and not kept; a row becomes stored (its value
and its optimizer state) the first time an update reaches it. Memory is therefore what the steps
touched: a 4-byte slot per row of the shard (a zero-filled array, whose untouched pages the kernel
never backs), plus the touched rows' records in an array that doubles when full. A record is the
row's value and its state slots side by side (`[value | slot 0 | slot 1]`), so an update gathers
and scatters each touched row once.

Ids here are global row ids of the rows this shard holds (see row_placement.py). An update is
planned first (`plan`: new values and state of the rows, nothing written), refused whole when
anything in it is not finite, and written only by `apply`, so a sharded server can ask every shard
before any applies.
"""

from __future__ import annotations

import numpy as np

from gradserve_services.engine import table_rows
from gradserve_services.errors import FailedPrecondition
from gradserve_services.optim import all_finite
from gradserve_services.optim.rows import RowOptimizer

from .row_placement import RowPlacement

__all__ = ["RowStore"]

INITIAL_CAPACITY = 1024


class RowStore:
    def __init__(self, name: str, shape, dtype, seed: int, shard: int, placement: RowPlacement,
                 optimizer: RowOptimizer):
        self.name, self.shape, self.dtype = name, tuple(int(n) for n in shape), np.dtype(dtype)
        self.seed, self.shard, self.placement, self.optimizer = int(seed), shard, placement, optimizer
        self.updates = 0  # updates applied to this table (the optimizer's step counter)
        local_rows = placement.shard_rows(self.shape[0], shard)
        self._slot_of = np.zeros(local_rows, dtype=np.int32)  # 0: never updated, else slot + 1
        self._count = 0
        self._ids = np.empty(0, dtype=np.int64)  # global id of each slot
        self._slots = optimizer.config.slots
        self._records = np.empty((0, self.shape[1] * (1 + len(self._slots))), dtype=self.dtype)

    # ----- reading -------------------------------------------------------------------------------

    @property
    def stored_rows(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes this table holds on the shard: the slot index and the stored rows' records."""
        return self._slot_of.nbytes + (self._records.shape[1] * self.dtype.itemsize + 8) * self._count

    def _gather(self, ids: np.ndarray, width: int) -> np.ndarray:
        """The first `width` columns of the records of `ids`: stored, or initial (value from the
        seed, state as the optimizer starts it)."""
        slots = self._slot_of[self.placement.local(ids)].astype(np.int64) - 1
        stored = slots >= 0
        if bool(stored.all()):
            return np.take(self._records[:, :width], slots, axis=0)
        out = np.empty((ids.shape[0], width), dtype=self.dtype)
        out[stored] = np.take(self._records[:, :width], slots[stored], axis=0)
        fresh = ~stored
        dim = self.shape[1]
        out[fresh, :dim] = table_rows(np, self.seed, self.name, ids[fresh], self.shape, self.dtype)
        if width > dim:
            start = self.optimizer.initial_state(1, dim, self.dtype)
            out[fresh, dim:] = np.concatenate([start[slot] for slot in self._slots], axis=1)
        return out

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (global, this shard's), stored or initial."""
        return self._gather(ids, self.shape[1])

    def read_state(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self._split(self._gather(ids, self._records.shape[1]))[1]

    def _split(self, records: np.ndarray):
        """`(values, {slot: state})` views of records."""
        dim = self.shape[1]
        return records[:, :dim], {slot: records[:, dim * (k + 1):dim * (k + 2)] for k, slot in enumerate(self._slots)}

    def dense(self) -> np.ndarray:
        """Every row of this shard, in local order (row `local * S + shard`)."""
        local = np.arange(self._slot_of.shape[0], dtype=np.int64)
        return self.read(self.placement.global_ids(local, self.shard))

    # ----- updating ------------------------------------------------------------------------------

    def plan(self, ids: np.ndarray, grad: np.ndarray):
        """`(new_rows, new_state)` of the update with mean gradient rows `grad`; writes nothing.
        FailedPrecondition if the gradient or the result is not finite."""
        if not all_finite(grad):
            raise FailedPrecondition(f"the gradient of {self.name!r} is not finite (the model "
                                     "overflows on this batch); nothing was applied",
                                     f"gradients.{self.name}")
        rows, state = self._split(self._gather(ids, self._records.shape[1]))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is the finding
            new_rows, new_state = self.optimizer.update(rows, state, grad, self.updates + 1)
        if not all(all_finite(array) for array in (new_rows, *new_state.values())):
            raise FailedPrecondition(f"the update would make rows of {self.name!r} not finite; "
                                     "nothing was applied", f"parameters.{self.name}")
        return new_rows, new_state

    def write(self, ids: np.ndarray, new_rows: np.ndarray, new_state) -> None:
        """Store planned rows (and count the update, empty or not, as torch counts its steps)."""
        self._put(ids, new_rows, new_state)
        self.updates += 1

    def _put(self, ids: np.ndarray, rows: np.ndarray, state) -> None:
        slots = self._slots_for(ids)
        self._records[slots] = np.concatenate([rows, *(state[slot] for slot in self._slots)], axis=1) \
            if self._slots else rows

    def _slots_for(self, ids: np.ndarray) -> np.ndarray:
        """Slots of `ids`, new rows given the next free ones."""
        local = self.placement.local(ids)
        slots = self._slot_of[local].astype(np.int64) - 1
        fresh = slots < 0
        added = int(fresh.sum())
        if added:
            self._reserve(self._count + added)
            new_slots = np.arange(self._count, self._count + added, dtype=np.int64)
            slots[fresh] = new_slots
            self._slot_of[local[fresh]] = (new_slots + 1).astype(np.int32)
            self._ids[new_slots] = ids[fresh]
            self._count += added
        return slots

    def _reserve(self, needed: int) -> None:
        capacity = self._ids.shape[0]
        if needed <= capacity:
            return
        capacity = max(INITIAL_CAPACITY, capacity)
        while capacity < needed:
            capacity *= 2
        self._ids = _grown(self._ids, capacity, self._count)
        self._records = _grown(self._records, capacity, self._count)

    # ----- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """The stored rows (rows never updated are their initial values, not saved)."""
        values, state = self._split(self._records[:self._count])
        arrays = {"ids": self._ids[:self._count], "rows": values}
        arrays.update({f"state/{slot}": values for slot, values in state.items()})
        return arrays

    def load(self, ids: np.ndarray, rows: np.ndarray, state: dict, updates: int) -> None:
        """Store `rows` (and their optimizer `state`) for `ids` of this shard, as `state()` gave them."""
        self._put(ids, rows, state)
        self.updates = int(updates)


def _grown(array: np.ndarray, capacity: int, used: int) -> np.ndarray:
    grown = np.empty((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[:used] = array[:used]
    return grown
