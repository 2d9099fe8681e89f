"""`TableLane`: the tables of one trainer's model, as the coordinator handles them.

A model's tables never travel whole. Each parameter-server shard holds its rows of every table
(row r on shard r mod S, row_placement.py), initialised there from (seed, table, row); the dense
parameters keep their own partition over the shards. Per sync step the coordinator, which holds the
batch, works out each worker shard's distinct ids per table (`engine.rows_read`) and the step's as
their union, asks every server once for its part of the step's ids (`pull_rows`, submitted before the step's
apply, so Ray's per-caller order makes it read the previous step's rows), and hands the same
answers to every worker as references: each server's answer is one object in the object store,
which every worker on its node maps without a copy, so a row that several workers' shards read
crosses the wire once, not once per worker; each worker picks its own rows out of it. Workers push
one summed gradient row per id they read; the servers add the pushes and scale by the step's count
(shard_tables.py), so N workers give exactly the full-batch mean gradient of every row.

Tables are trained in sync mode without compression (both refused otherwise, naming the field):
the rows a worker read are the rows the update then changes, which an on-arrival update would not
respect, and compressed parts carry dense arrays only.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from gradserve_services.engine import Model, SparseRows, rows_read
from gradserve_services.engine.lookups import lookup_count, sorted_unique
from gradserve_services.engine.table_init import init_table
from gradserve_services.errors import InvalidArgument
from gradserve_services.optim.rows import TableOptimizerConfig

from .row_placement import RowPlacement
from .table_stream import TableStream
from .worker_rows import WIRE_IDS, pull_requests, wire_ids

__all__ = ["TableLane", "InitialRows"]


class InitialRows:
    """A table parameter given as its initial rows' seed instead of an array: the servers make
    any row of it as `table_rows(seed, table, row)`, exactly `Model.init_parameters(seed)`'s."""

    def __init__(self, seed: int, dtype="float32"):
        self.seed, self.dtype = int(seed), np.dtype(dtype)


class TableLane:
    def __init__(self, model: Model, config, dtype, seed: int, given: Mapping[str, np.ndarray]):
        self.model = model
        self.shapes = {name: tuple(shape) for name, shape in model.graph.tables.items()}
        self.dtype = np.dtype(dtype)
        self.seed = int(seed)
        self.shards = int(config.ps_shards)
        self.optimizer = config.table_optimizer.to_dict()
        self._given = dict(given)  # tables the caller sent whole (loaded as their rows)

    @classmethod
    def of(cls, model: Model, config, params: Mapping) -> tuple["TableLane | None", dict]:
        """`(lane or None, params without the tables)`. Tables come as arrays or `InitialRows`;
        with `config.dense_tables` they stay among the dense parameters, made whole here."""
        tables = model.graph.tables
        if not tables:
            return None, dict(params)
        if config.dense_tables:
            return None, {name: init_table(np, value.seed, name, tables[name], value.dtype)
                          if isinstance(value, InitialRows) else value for name, value in params.items()}
        if config.consistency != "sync":
            raise InvalidArgument("a model with tables trains in sync mode", "config.consistency")
        if config.compression != "none":
            raise InvalidArgument("a model with tables sends rows uncompressed", "config.compression")
        dense = {name: value for name, value in params.items() if name not in tables}
        marks = [value for name, value in params.items() if isinstance(value, InitialRows)]
        given = {name: value for name, value in params.items()
                 if name in tables and not isinstance(value, InitialRows)}
        check = dict(dense)
        for name in tables:  # validated as the rows the tables hold: none, or the given arrays
            value = params.get(name)
            if isinstance(value, InitialRows):
                value = SparseRows(np.zeros(0, np.int64), np.zeros((0, tables[name][1]), value.dtype),
                                   tables[name])
            check[name] = value
        dtype = model.validate_parameters(check)
        seed = marks[0].seed if marks else 0
        return cls(model, config, dtype, seed, given), dense

    # ----- servers -------------------------------------------------------------------------------

    def layout(self, shard: int, shards: int | None = None) -> dict:
        """What server shard `shard` is told about the tables (shard_tables.py)."""
        return {"tables": {name: list(shape) for name, shape in self.shapes.items()},
                "dtype": self.dtype.name, "seed": self.seed, "shard": shard,
                "shards": self.shards if shards is None else shards, "optimizer": self.optimizer}

    def initial_rows(self, shard: int) -> dict | None:
        """Rows of tables the caller sent whole that shard `shard` holds, as a state holds them."""
        if not self._given:
            return None
        arrays = {}
        for name, table in self._given.items():
            ids = np.arange(shard, table.shape[0], self.shards, dtype=np.int64)
            arrays[f"rows/{name}/ids"] = ids
            arrays[f"rows/{name}/rows"] = np.ascontiguousarray(table[shard::self.shards])
            for slot in _slots(self.optimizer):
                arrays[f"rows/{name}/state/{slot}"] = np.zeros_like(arrays[f"rows/{name}/rows"])
        return arrays

    # ----- a step --------------------------------------------------------------------------------

    def prepare(self, backend, servers, table_id: str, batch, tasks: list[dict]) -> tuple[list, dict]:
        """Add each task's ids (`task["tables"]`) and submit the step's pulls; returns `(pull
        futures per task, the step's pull figures)`."""
        # the tasks' rows cover the batch: the step's ids are the union of theirs (a merge of a
        # few hundred sorted ids per table, cheaper than a second pass over the batch's lookups)
        reads = [rows_read(np, self.model.graph, batch.slice(np, task["start"], task["stop"])) for task in tasks]
        union = {name: sorted_unique(np, np.concatenate([read[name] for read in reads])) for name in self.shapes}
        requests = pull_requests(union, len(servers))
        pulls = [backend.submit(server, "pull_rows", table_id, request)[0]
                 for server, request in zip(servers, requests)]
        pulled = {name: wire_ids(ids) for name, ids in union.items()}
        for task, read in zip(tasks, reads):
            task["tables"] = {"shapes": self.shapes, "shards": len(servers), "pulled": pulled,
                              "read": {name: wire_ids(ids) for name, ids in read.items()}}
        rows = sum(ids.shape[0] for ids in union.values())
        figures = {"row_lookups": lookup_count(self.model.graph, batch), "rows_pulled": rows,
                   "bytes_pulled": sum(ids.shape[0] * (self.shapes[name][1] * self.dtype.itemsize
                                                       + np.dtype(WIRE_IDS).itemsize)
                                       for name, ids in union.items())}
        return [pulls] * len(tasks), figures

    def fields(self, stats: list, reports: list, figures: dict) -> dict:
        """The step's table fields of StepResult (config.py) from the pulls (`prepare`), the
        workers' stats and every server shard's report."""
        whole = sum(rows * dim for rows, dim in self.shapes.values()) * self.dtype.itemsize
        return {
            **figures,
            "rows_pushed": sum(s.get("rows_pushed", 0) for s in stats),
            "bytes_pushed": sum(s.get("bytes_pushed", 0) for s in stats),
            "rows_updated": sum(r.get("rows_updated", 0) for r in reports),
            "table_rows": sum(r.get("table_rows", 0) for r in reports),
            "table_bytes": sum(r.get("table_bytes", 0) for r in reports),
            "dense_table_bytes": 2 * len(stats) * whole,
        }

    # ----- reading -------------------------------------------------------------------------------

    def whole(self, get, submit, servers, table_id: str) -> dict[str, np.ndarray]:
        """Every table, assembled from the shards' rows (row local * S + shard)."""
        tables = {}
        for name, shape in self.shapes.items():
            parts = get([submit(server, "dense_rows", table_id, name)[0] for server in servers])
            table = np.empty(shape, dtype=self.dtype)
            for shard, part in enumerate(parts):
                table[shard::len(servers)] = part
            tables[name] = table
        return tables

    def streams(self, get, submit, servers, table_id: str) -> dict[str, TableStream]:
        """Every table as a `TableStream`: read from the shards one range of rows at a time when
        its parts are taken, never assembled whole."""
        def asker(name: str):
            return lambda start, stop: [submit(server, "table_row_range", table_id, name, start, stop)[0]
                                        for server in servers]

        return {name: TableStream(name, shape, self.dtype, asker(name), get) for name, shape in self.shapes.items()}

    def rows(self, get, submit, servers, table_id: str, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (any order, repeats allowed, already checked in range) of table `name`."""
        unique, inverse = np.unique(ids, return_inverse=True)
        requests = pull_requests({name: unique}, len(servers))
        answers = get([submit(server, "pull_rows", table_id, request)[0]
                       for server, request in zip(servers, requests)])
        rows = np.empty((unique.shape[0], self.shapes[name][1]), dtype=self.dtype)
        for positions, answer in zip(RowPlacement(len(servers)).split(unique), answers):
            rows[positions] = answer[name]
        return rows[inverse.reshape(-1)]

    def stored_rows(self, arrays: Mapping) -> dict:
        """A `state()`'s stored rows of each table as `SparseRows` (to validate a checkpoint)."""
        out = {}
        for name, shape in self.shapes.items():
            ids = np.asarray(arrays.get(f"rows/{name}/ids", np.zeros(0, np.int64)))
            rows = np.asarray(arrays.get(f"rows/{name}/rows", np.zeros((0, shape[1]), self.dtype)))
            order = np.argsort(ids, kind="stable")
            out[name] = SparseRows(ids[order], rows[order], shape)
        return out

    @staticmethod
    def merge_states(states: list) -> dict[str, np.ndarray]:
        """The shards' table rows in one set of arrays (each shard's rows follow the previous')."""
        merged: dict[str, list] = {}
        for arrays, _ in states:
            for key, value in arrays.items():
                if key.startswith("rows/"):
                    merged.setdefault(key, []).append(np.asarray(value))
        return {key: np.concatenate(values) for key, values in merged.items()}


def _slots(optimizer: Mapping) -> tuple[str, ...]:
    return TableOptimizerConfig.from_dict(optimizer).slots
