"""`RowStore`: one table's rows on one parameter-server shard, materialised lazily.

A table of millions of rows starts as a function, not an array: row r of table T is
`table_rows(seed, T, r)` (engine/table_init.py), the very value `Model.init_parameters` gives it.
A row read before any update is computed on the spot and not kept; a row becomes stored (its value
and its optimizer state) the first time an update reaches it. Memory is therefore what the steps
touched: a 4-byte slot per row of the shard (a zero-filled array, whose untouched pages the kernel
never backs), plus the touched rows' values and state in arrays that double when full.

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
        self._values = np.empty((0, self.shape[1]), dtype=self.dtype)
        self._state = optimizer.initial_state(0, self.shape[1], self.dtype)

    # ----- reading -------------------------------------------------------------------------------

    @property
    def stored_rows(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes this table holds on the shard: the slot index and the stored rows' values and state."""
        per_row = self.shape[1] * self.dtype.itemsize * (1 + len(self._state)) + 8
        return self._slot_of.nbytes + per_row * self._count

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (global, this shard's), stored or initial."""
        slots = self._slot_of[self.placement.local(ids)].astype(np.int64) - 1
        stored = slots >= 0
        if bool(stored.all()):
            return self._values[slots]
        out = np.empty((ids.shape[0], self.shape[1]), dtype=self.dtype)
        out[stored] = self._values[slots[stored]]
        fresh = ~stored
        out[fresh] = table_rows(np, self.seed, self.name, ids[fresh], self.shape, self.dtype)
        return out

    def read_state(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        slots = self._slot_of[self.placement.local(ids)].astype(np.int64) - 1
        stored = slots >= 0
        state = self.optimizer.initial_state(ids.shape[0], self.shape[1], self.dtype)
        for slot, values in state.items():
            values[stored] = self._state[slot][slots[stored]]
        return state

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
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is the finding
            new_rows, new_state = self.optimizer.update(self.read(ids), self.read_state(ids), grad,
                                                        self.updates + 1)
        if not all(all_finite(array) for array in (new_rows, *new_state.values())):
            raise FailedPrecondition(f"the update would make rows of {self.name!r} not finite; "
                                     "nothing was applied", f"parameters.{self.name}")
        return new_rows, new_state

    def write(self, ids: np.ndarray, new_rows: np.ndarray, new_state) -> None:
        """Store planned rows (and count the update, empty or not, as torch counts its steps)."""
        slots = self._slots_for(ids)
        self._values[slots] = new_rows
        for slot, values in new_state.items():
            self._state[slot][slots] = values
        self.updates += 1

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
        self._values = _grown(self._values, capacity, self._count)
        self._state = {slot: _grown(values, capacity, self._count) for slot, values in self._state.items()}

    # ----- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """The stored rows (rows never updated are their initial values, not saved)."""
        arrays = {"ids": self._ids[:self._count], "rows": self._values[:self._count]}
        arrays.update({f"state/{slot}": values[:self._count] for slot, values in self._state.items()})
        return arrays

    def load(self, ids: np.ndarray, rows: np.ndarray, state: dict, updates: int) -> None:
        """Store `rows` (and their optimizer `state`) for `ids` of this shard, as `state()` gave them."""
        slots = self._slots_for(ids)
        self._values[slots] = rows
        for slot in self._state:
            self._state[slot][slots] = state[slot]
        self.updates = int(updates)


def _grown(array: np.ndarray, capacity: int, used: int) -> np.ndarray:
    grown = np.empty((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[:used] = array[:used]
    return grown
