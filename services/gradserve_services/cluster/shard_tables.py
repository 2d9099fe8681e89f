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

from gradserve_services.engine.lookups import sorted_unique
from gradserve_services.errors import InvalidArgument
from gradserve_services.optim.rows import RowOptimizer

from .row_placement import RowPlacement
from .row_store import RowStore

__all__ = ["ShardTables"]


def _sum_pushes(given: list, dim: int, dtype):
    """`(sorted unique keys, row sums)` of `[(keys, rows)]`, the keys of each unique (one row per
    id a worker read): each part is placed by a search of the union's keys and added, in the order
    given, so the sums equal `SparseRows.from_lookups`' (which sorts every row's key) at a fifth
    of its time."""
    keys = sorted_unique(np, np.concatenate([part_keys for part_keys, _ in given]))
    sums = np.zeros((keys.shape[0], dim), dtype=dtype)
    for part_keys, rows in given:
        sums[np.searchsorted(keys, part_keys)] += rows
    return keys, sums


class ShardTables:
    def __init__(self, layout: Mapping):
        self.layout = dict(layout)
        self.placement = RowPlacement(layout["shards"])
        self.optimizer = RowOptimizer(layout["optimizer"])
        by_dim: dict[int, dict[str, int]] = {}
        for name, (rows, dim) in layout["tables"].items():
            by_dim.setdefault(int(dim), {})[name] = int(rows)
        # one store per row width: a step updates all its tables in one pass (row_store.py)
        self.stores = [RowStore(tables, dim, layout["dtype"], layout["seed"], layout["shard"], self.placement,
                                self.optimizer) for dim, tables in by_dim.items()]
        self._store_of = {name: store for store in self.stores for name in store.rows_of}
        # With several server shards the trainer asks each to `check` an update before it applies
        # the same one: the plan made for the check is kept for the apply (same pushes, scale and
        # table state, see _signature), so the rows' update is computed once per step.
        self._planned: tuple | None = None

    def pull(self, ids_by_table: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`{table: rows}` for `{table: global ids of this shard}`: one gather per store."""
        out = {}
        for store in self.stores:
            names = [name for name in ids_by_table if self._store(name) is store]
            if not names:
                continue
            keys = [store.keys(name, np.asarray(ids_by_table[name])) for name in names]
            rows = store.gather(np.concatenate(keys), store.dim)
            bounds = np.cumsum([0] + [part.shape[0] for part in keys])
            out.update({name: rows[bounds[i]:bounds[i + 1]] for i, name in enumerate(names)})
        for name in ids_by_table:
            self._store(name)  # an unknown table named even when no store holds one
        return out

    def plan(self, pushes: list, scale: float, *, keep: bool = False):
        """The planned update of `scale * sum(pushes)` (each push `{table: (ids, row sums)}`):
        `(writes, squared_norm, rows_updated)`, nothing written; FailedPrecondition if any table's
        gradient or update is not finite. `keep`: a check's plan, made afresh and kept for the
        apply after it."""
        signature = self._signature(pushes, scale)
        if not keep and self._planned is not None and self._planned[0] == signature:
            return self._planned[1]
        planned = self._plan(pushes, scale)
        self._planned = (signature, planned) if keep else None
        return planned

    def _signature(self, pushes: list, scale: float) -> tuple:
        """What tells the apply that the kept plan is its own: the check before it on this shard
        was given the very same arrays (an apply's arguments are its check's, read in place from
        the same objects; a copy only misses and plans again), the scale, and every store's update
        count (any write changes it). Addresses, not a checksum: reading every pushed row again
        cost as much as planning half of them."""
        parts = tuple((name, ids.shape[0], ids.__array_interface__["data"][0], rows.__array_interface__["data"][0])
                      for push in pushes for name, (ids, rows) in push.items())
        return scale, parts, tuple(store.updates for store in self.stores)

    def _plan(self, pushes: list, scale: float):
        writes, squared, updated = [], 0.0, 0
        for store in self.stores:
            given = [(store.keys(name, ids), rows) for push in pushes for name, (ids, rows) in push.items()
                     if self._store(name) is store]
            if not given:
                continue
            with np.errstate(over="ignore", invalid="ignore"):  # store.plan refuses what overflows
                keys, grad = _sum_pushes(given, store.dim, store.dtype)
                grad *= store.dtype.type(scale)
            squared += float(np.vdot(grad, grad))
            updated += int(keys.shape[0])
            writes.append((store, keys, store.plan(keys, grad)))
        return writes, squared, updated

    def write(self, writes) -> None:
        """Store a plan's rows; every table counts the update, touched or not (torch steps every
        parameter that has a gradient, an empty one included)."""
        self._planned = None
        written = set()
        for store, keys, records in writes:
            store.write(keys, records)
            written.add(id(store))
        for store in self.stores:
            if id(store) not in written:
                store.updates += 1

    def stored(self) -> tuple[int, int]:
        """`(rows stored, bytes held)` over this shard's tables."""
        return (sum(store.stored_rows for store in self.stores), sum(store.nbytes for store in self.stores))

    def dense(self, name: str) -> np.ndarray:
        return self._store(name).dense(name)

    def read_state(self, name: str, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self._store(name).read_state(name, ids)

    def updates(self, name: str) -> int:
        return self._store(name).updates

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {f"rows/{name}/{key}": value for name, store in self._store_of.items()
                  for key, value in store.state(name).items()}
        return arrays, {"updates": {name: store.updates for name, store in self._store_of.items()}}

    def load(self, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        """Take this shard's rows out of a `state()` of any number of shards (merged arrays)."""
        for name, store in self._store_of.items():
            ids = np.asarray(arrays.get(f"rows/{name}/ids", np.zeros(0, np.int64)), dtype=np.int64)
            store.updates = max(store.updates, int(meta["updates"][name]))
            mine = ids % self.placement.shards == store.shard
            if not mine.any():
                continue
            rows = np.asarray(arrays[f"rows/{name}/rows"])[mine]
            state = {slot: np.asarray(arrays[f"rows/{name}/state/{slot}"])[mine]
                     for slot in self.optimizer.config.slots}
            store.load(name, ids[mine], rows, state)

    def _store(self, name: str) -> RowStore:
        store = self._store_of.get(name)
        if store is None:
            raise InvalidArgument(f"{name!r} is not a table of this model", "table")
        return store

    def row_range(self, name: str, start: int, stop: int) -> np.ndarray:
        """The rows of table `name` this shard holds among rows [start, stop), in row order (rows
        `first, first + S, ...`, `first` the range's first row of this shard): one part of a
        table read out a range at a time (table_stream.py)."""
        store = self._store(name)
        rows = store.rows_of[name]
        if not 0 <= int(start) <= int(stop) <= rows:
            raise InvalidArgument(f"rows [{start}, {stop}) are not within the {rows} rows of {name!r}", "rows")
        shards = self.placement.shards
        first = int(start) + (store.shard - int(start)) % shards
        return store.read(name, np.arange(first, int(stop), shards, dtype=np.int64))
