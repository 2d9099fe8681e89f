"""`ShardTables`: one trainer's tables on one parameter-server shard (this shard's rows of each).

Keyed push/pull in ps-lite's sense: `pull` answers the rows of the ids asked, `plan` + `write`
apply pushed row gradients. Workers push, per table, the sorted unique ids of this shard their
shard of the batch touched and one gradient-SUM row each; the shard adds the pushes of every
worker (an id several workers touched gets the sum of their rows) and scales by `weight / count`
(count: the samples of the whole step), so N workers give exactly the full-batch mean gradient of
each row, as the dense path does.

`layout` (JSON-able, the same on every shard but `shard`) describes the tables:
`{"tables": {name: [rows, dim]}, "dtype", "seed", "shard", "shards", "optimizer": {...}}`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from gradserve_services.engine import SparseRows
from gradserve_services.errors import InvalidArgument
from gradserve_services.optim.rows import RowOptimizer

from .row_placement import RowPlacement
from .row_store import RowStore

__all__ = ["ShardTables"]


class ShardTables:
    def __init__(self, layout: Mapping):
        self.layout = dict(layout)
        self.placement = RowPlacement(layout["shards"])
        self.optimizer = RowOptimizer(layout["optimizer"])
        self.stores = {name: RowStore(name, shape, layout["dtype"], layout["seed"], layout["shard"],
                                      self.placement, self.optimizer)
                       for name, shape in layout["tables"].items()}
        # With several server shards the trainer asks each to `check` an update before it applies
        # the same one: the plan made for the check is kept for the apply (same pushes, scale and
        # table state, see _signature), so the rows' update is computed once per step.
        self._planned: tuple | None = None

    def pull(self, ids_by_table: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`{table: rows}` for `{table: global ids of this shard}`."""
        return {name: self._store(name).read(np.asarray(ids, dtype=np.int64))
                for name, ids in ids_by_table.items()}

    def plan(self, pushes: list, scale: float):
        """The planned update of `scale * sum(pushes)` (each push `{table: (ids, row sums)}`):
        `(writes, squared_norm, rows_updated)`, nothing written; FailedPrecondition if any table's
        gradient or update is not finite."""
        signature = self._signature(pushes, scale)
        if self._planned is not None and self._planned[0] == signature:
            return self._planned[1]
        planned = self._plan(pushes, scale)
        self._planned = (signature, planned)
        return planned

    def _signature(self, pushes: list, scale: float) -> tuple:
        """What a plan depends on: the pushes (ids and a checksum of their rows), the scale, and
        every table's update count (any write changes it)."""
        parts = tuple((name, ids.shape[0], int(ids.sum()), float(np.sum(rows, dtype=np.float64)))
                      for push in pushes for name, (ids, rows) in push.items())
        return scale, parts, tuple(store.updates for store in self.stores.values())

    def _plan(self, pushes: list, scale: float):
        writes, squared, updated = [], 0.0, 0
        for name, store in self.stores.items():
            given = [push[name] for push in pushes if name in push]
            if not given:
                continue
            with np.errstate(over="ignore", invalid="ignore"):  # store.plan refuses what overflows
                summed = SparseRows.combine(np, [SparseRows(ids.astype(np.int64, copy=False), rows, store.shape)
                                                 for ids, rows in given])
                grad = summed.rows * store.dtype.type(scale)
            squared += float(np.vdot(grad, grad))
            updated += int(summed.ids.shape[0])
            writes.append((store, summed.ids, *store.plan(summed.ids, grad)))
        return writes, squared, updated

    def write(self, writes) -> None:
        """Store a plan's rows; every table counts the update, touched or not (torch steps every
        parameter that has a gradient, an empty one included)."""
        self._planned = None
        written = set()
        for store, ids, new_rows, new_state in writes:
            store.write(ids, new_rows, new_state)
            written.add(store.name)
        for name, store in self.stores.items():
            if name not in written:
                store.updates += 1

    def stored(self) -> tuple[int, int]:
        """`(rows stored, bytes held)` over this shard's tables."""
        return (sum(store.stored_rows for store in self.stores.values()),
                sum(store.nbytes for store in self.stores.values()))

    def dense(self, name: str) -> np.ndarray:
        return self._store(name).dense()

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {f"rows/{name}/{key}": value for name, store in self.stores.items()
                  for key, value in store.state().items()}
        return arrays, {"updates": {name: store.updates for name, store in self.stores.items()}}

    def load(self, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        """Take this shard's rows out of a `state()` of any number of shards (merged arrays)."""
        for name, store in self.stores.items():
            ids = np.asarray(arrays.get(f"rows/{name}/ids", np.zeros(0, np.int64)), dtype=np.int64)
            mine = ids % self.placement.shards == store.shard
            rows = np.asarray(arrays[f"rows/{name}/rows"])[mine] if ids.size else None
            state = {slot: np.asarray(arrays[f"rows/{name}/state/{slot}"])[mine]
                     for slot in self.optimizer.config.slots} if ids.size else {}
            if ids.size:
                store.load(ids[mine], rows, state, meta["updates"][name])
            else:
                store.updates = int(meta["updates"][name])

    def _store(self, name: str) -> RowStore:
        store = self.stores.get(name)
        if store is None:
            raise InvalidArgument(f"{name!r} is not a table of this model", "table")
        return store
