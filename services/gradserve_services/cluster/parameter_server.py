"""Parameter server: `ParameterTable` (one trainer's parameters on one shard) and
`ParameterServer` (the actor class hosting the tables of many trainers, keyed push/pull style).

A table owns its parameters (writable, updated in place), its optimizer state and a version that
counts applied updates. `apply` is exactly-once per update key: a key seen before returns the
recorded report and changes nothing (the log keeps the keys of a window of recent steps, see
steplog.py). An update that would make a parameter non-finite is refused whole (FailedPrecondition)
and changes nothing; `check` gives the same verdict without applying, so a trainer with several
server shards asks each before any applies. The staleness rule lives here too: a gradient computed
on version v is applied only if `version - v <= bound`; otherwise it is dropped or down-weighted.

A model's tables (embedding weights) are not among a table's `params`: each shard holds its rows of
every table (`ShardTables`, row r on shard r mod S), gradient parts carry them as `part["rows"]`
(`{table: (ids, row sums)}`), and the same update key, version and refusal rules cover them.
"""

from __future__ import annotations

import math
import os
import time
from typing import Mapping

import numpy as np

from gradserve_services.errors import NotFound, Unavailable
from gradserve_services.optim import Optimizer, global_norm

from .compression import decode
from .gradient_push import pushed_part
from .handover import Received, take
from .pushed_updates import PushedUpdates
from .shard_tables import ShardTables
from .shared import Attachments, BlockRef, SharedMemoryLane, remove_block
from .steplog import DEFAULT_STEP_WINDOW, StepLog
from .update_board import APPLIED, FAILED, PostedBoard, kept_board

__all__ = ["ParameterTable", "ParameterServer", "StalenessRule"]


class StalenessRule:
    """`bound=None` accepts any staleness (async); `policy` is "drop" or "downweight"."""

    def __init__(self, bound: int | None = None, policy: str = "drop"):
        self.bound, self.policy = bound, policy

    def weight(self, versions_behind: int) -> float:
        """Weight of a gradient `versions_behind` versions old: 1, 0 (dropped) or a fraction."""
        if self.bound is None or versions_behind <= self.bound:
            return 1.0
        if self.policy == "drop":
            return 0.0
        return (self.bound + 1) / (versions_behind + 1)

    def to_dict(self) -> dict:
        return {"bound": self.bound, "policy": self.policy}


class ParameterTable:
    def __init__(self, params: Mapping[str, np.ndarray], optimizer_config,
                 rule: StalenessRule | None = None, allocate=None,
                 step_window: int = DEFAULT_STEP_WINDOW, tables: Mapping | None = None):
        # Own writable, contiguous copies: the optimizer updates them in place. `allocate` maps
        # `params` to writable arrays (shared-memory views) to hold them instead: their own where
        # they lie in a block the server adopted. Arrays handed over (handover.py: received or
        # loaded for this table in this process) are kept as they are.
        if allocate is None:
            self.params = {name: value if take(value) else np.array(value, copy=True, order="C")
                           for name, value in params.items()}
        else:
            self.params = allocate(params)
            for name, value in params.items():
                if self.params[name] is not value:
                    np.copyto(self.params[name], value)
        self.optimizer = Optimizer(optimizer_config, self.params)
        self.rule = rule or StalenessRule(bound=0)
        self.version = 0
        self.log = StepLog(step_window)
        self.rows = ShardTables(tables) if tables else None  # this shard's rows of the tables

    def snapshot(self) -> tuple[int, dict]:
        """`(version, params)`; the live arrays, so copy (or serialize) before the next update."""
        return self.version, self.params

    def squared_norm(self, parts: list, grad_scale: float) -> float:
        """Squared norm of this shard's part of `grad_scale * sum(parts)` (phase one of clipping
        across shards)."""
        return global_norm([decode(part) for part in parts], grad_scale) ** 2

    def check(self, parts: list, count: int, computed_on: int, norm: float | None = None) -> None:
        """Raise FailedPrecondition if `apply` of these arguments would be refused as non-finite."""
        weight = self.rule.weight(self.version - computed_on)
        if weight > 0.0:
            count = count if isinstance(count, int) else sum(count)
            if self.rows is not None:
                self.rows.plan(_pushes(parts), weight / count, keep=True)  # for the apply after it
            self.optimizer.check(self.params, [decode(part) for part in parts],
                                 grad_scale=weight / count, norm=norm)

    def apply(self, key: str, parts: list, count, computed_on: int,
              norm: float | None = None, idle_cores: bool = False) -> dict:
        """Apply `sum(parts) / count` once for `key`; returns the report of what happened.

        `count` is the samples summed in the parts: one number, or one per part, in which case the
        report carries the parts' gradient products and the update-to-weight ratio per parameter
        (signals.py), measured while the data is read for the update anyway."""
        recorded = self.log.lookup(key)
        if recorded is not None:
            return {**recorded, "duplicate": True}
        started = time.perf_counter()
        measured = not isinstance(count, int)
        count = sum(count) if measured else count
        versions_behind = self.version - computed_on
        weight = self.rule.weight(versions_behind)
        report = {"key": key, "duplicate": False, "staleness": versions_behind, "weight": weight,
                  "applied": weight > 0.0, "lr": 0.0, "grad_norm": math.nan}
        if weight > 0.0:
            grads = [decode(part) for part in parts]
            ratios, products = ({}, {}) if measured else (None, None)
            # tables first: their plan writes nothing, so a refusal by either changes nothing
            writes, rows_squared, rows_updated = self.rows.plan(_pushes(parts), weight / count) \
                if self.rows is not None else (None, 0.0, 0)
            info = self.optimizer.step(self.params, grads, grad_scale=weight / count, norm=norm,
                                       update_ratios=ratios, products=products, idle_cores=idle_cores)
            if writes is not None:
                self.rows.write(writes)
            self.version += 1
            report.update(lr=info["lr"], grad_norm=math.sqrt(info["grad_norm"] ** 2 + rows_squared),
                          rows_updated=rows_updated)
            if measured:
                report.update(products=products, update_ratios=ratios)
        if self.rows is not None:
            report["table_rows"], report["table_bytes"] = self.rows.stored()
        report.update(version=self.version, apply_ms=(time.perf_counter() - started) * 1e3)
        self.log.record(key, report)
        return report

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        optimizer_arrays, optimizer_meta = self.optimizer.state_dict()
        arrays = {f"param/{name}": value for name, value in self.params.items()}
        arrays.update({f"optim/{key}": value for key, value in optimizer_arrays.items()})
        mark, records = self.log.state()
        meta = {"version": self.version, "optimizer": optimizer_meta, "rule": self.rule.to_dict(),
                "log": dict(records), "log_mark": mark}
        if self.rows is not None:
            row_arrays, meta["rows"] = self.rows.state()
            arrays.update(row_arrays)
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: Mapping[str, np.ndarray], meta: Mapping, names,
                   allocate=None, step_window: int = DEFAULT_STEP_WINDOW,
                   tables: Mapping | None = None) -> "ParameterTable":
        """The table for parameters `names` out of a (possibly merged) `state()`; with `tables`
        (this shard's layout), its rows of the tables, from a state of any number of shards."""
        params = {name: arrays[f"param/{name}"] for name in names}
        rule = StalenessRule(**meta["rule"])
        table = cls(params, meta["optimizer"]["config"], rule, allocate, step_window, tables)
        if table.rows is not None:
            table.rows.load(arrays, meta["rows"])
        prefix = "optim/"
        optimizer_arrays = {key[len(prefix):]: value for key, value in arrays.items()
                            if key.startswith(prefix) and key[len(prefix):].split("/")[0] in params}
        table.optimizer.load_state_dict(optimizer_arrays, meta["optimizer"])
        table.version = int(meta["version"])
        table.log = StepLog.from_state(meta.get("log_mark"), meta.get("log", {}), step_window)
        return table


def _norm_of(squares) -> float | None:
    return math.sqrt(sum(squares)) if squares else None


def _pushes(parts) -> list:
    """The table-row gradients of each part that carries some."""
    return [part["rows"] for part in parts if part.get("rows")]


class ParameterServer:
    """Hosts `ParameterTable`s by table id (one per trainer); the Ray actor class.

    A server started with the executor's shared-memory area (`shared_area`) it can map (its lane, chosen once
    here) keeps the parameters of a table created `in_shared_memory` (sync mode only) in a block:
    what it publishes for the workers is then `(version, BlockRef)`, a few bytes, instead of a copy
    of every parameter; and gradient parts may arrive as blocks too.

    Parameters given to `create_table` / `load_table` may arrive as `Received` (handover.py): a
    block the gateway decoded them into. A table in shared memory adopts a block that holds exactly
    its parameters as its own parameter block (no copy); otherwise the table copies them out of
    it, as out of any array."""

    def __init__(self, shared_area: tuple[str, str] | None = None):
        self.tables: dict[str, ParameterTable] = {}
        self._blocks: dict[str, BlockRef] = {}  # table id -> its parameter block
        self._lane = SharedMemoryLane.joined(shared_area)
        self._pushes = PushedUpdates()  # gradient buckets pushed during backward, by attempt
        self._boards: dict[str, PostedBoard] = {}  # table id -> its update board

    def pid(self) -> int:
        return os.getpid()

    def metadata(self) -> dict:
        return {"pid": os.getpid(), "shared_memory": self._lane is not None}

    def create_table(self, table_id: str, params: Mapping, optimizer_config, rule: dict, in_shared_memory: bool = False,
                     step_window: int = DEFAULT_STEP_WINDOW, tables: Mapping | None = None,
                     initial_rows: Mapping | None = None):
        """Create (or replace) a table; returns what the workers read its parameters from.
        `tables`: this shard's layout of the model's tables (shard_tables.py); `initial_rows`:
        rows given by the caller instead of the initial ones, as a `state()` holds them."""
        def build(params, allocate):
            table = ParameterTable(params, optimizer_config, StalenessRule(**rule), allocate,
                                   step_window, tables)
            if initial_rows:
                table.rows.load(initial_rows, {"updates": {name: 0 for name in tables["tables"]}})
            return table
        return self._install(table_id, in_shared_memory, params, build)

    def load_table(self, table_id: str, arrays, meta: Mapping, names, in_shared_memory: bool = False,
                   step_window: int = DEFAULT_STEP_WINDOW, tables: Mapping | None = None):
        return self._install(table_id, in_shared_memory, arrays, lambda arrays, allocate: ParameterTable.from_state(
            arrays, meta, names, allocate, step_window, tables))

    def _install(self, table_id: str, in_shared_memory: bool, given, build):
        """Build a table of `given` (arrays, or `Received`: adopted or copied out of the block;
        its parameters in a new block where the lane allows), then replace the old one and its
        block; if building fails, the old table and block stay as they were, and any new block
        (an adopted one's new name too) is removed."""
        new_blocks: list[BlockRef] = []
        try:
            arrays, adopted = self._landed(table_id, in_shared_memory, given, new_blocks)
            table = build(arrays, self._allocator(table_id, in_shared_memory, new_blocks, adopted))
        except BaseException:
            for block in new_blocks:
                remove_block(block)
            raise
        old = self._blocks.pop(table_id, None)
        if old is not None:
            remove_block(old)
        if new_blocks:
            self._blocks[table_id] = new_blocks[0]
        self.tables[table_id] = table
        return self.published(table_id)

    def drop_table(self, table_id: str) -> None:
        self.tables.pop(table_id, None)
        self._pushes.drop_table(table_id)
        self._boards.pop(table_id, None)
        block = self._blocks.pop(table_id, None)
        if block is not None:
            remove_block(block)
        if self._lane is not None:
            self._lane.forget(table_id)

    def published(self, table_id: str):
        """`(version, params)`, or `(version, BlockRef)` for a table in shared memory."""
        table = self._table(table_id)
        block = self._blocks.get(table_id)
        return (table.version, block) if block is not None else table.snapshot()

    def _landed(self, table_id: str, in_shared_memory: bool, given, new_blocks: list) -> tuple[Mapping, dict]:
        """`(arrays, adopted views)` of what `create_table` / `load_table` were given. A `Received`
        block that holds exactly this table's parameters becomes its parameter block (a second name
        for the same pages, in `new_blocks`); any other is mapped here only to be copied from."""
        if not isinstance(given, Received):
            return given, {}
        if in_shared_memory and self._lane is not None:
            block = self._lane.adopt(f"{table_id}-params", given.block)
            if block is not None:
                new_blocks.append(block[0])
                return given.arrays(block[1]), block[1]
        return given.arrays(Attachments().arrays(given.block)), {}

    def _allocator(self, table_id: str, in_shared_memory: bool, new_blocks: list, adopted: Mapping):
        if not in_shared_memory or self._lane is None:
            return None
        lane = self._lane
        adopted_ids = {id(view) for view in adopted.values()}

        def allocate(params):
            if adopted_ids and {id(value) for value in params.values()} == adopted_ids:
                return dict(params)  # they lie in the adopted block already
            while new_blocks:  # an adopted block these parameters do not fill: not the table's
                remove_block(new_blocks.pop())
            arrays = {name: (value.dtype, value.shape) for name, value in params.items()}
            block = lane.allocate(f"{table_id}-params", arrays)
            if block is None:  # no room in the tmpfs: plain arrays, published by copy
                return {name: np.empty(shape, dtype) for name, (dtype, shape) in arrays.items()}
            new_blocks.append(block[0])
            return block[1]

        return allocate

    # Gradient parts come last, as separate arguments: Ray resolves top-level references only, so
    # the workers' gradients reach this method straight from the object store.

    def squared_norm(self, table_id: str, grad_scale: float, *parts) -> float:
        return self._table(table_id).squared_norm(self._dense(parts, table_id), grad_scale)

    def check(self, table_id: str, count: int, computed_on: int, norm: float | None, *parts) -> None:
        """FailedPrecondition if `apply` of these arguments would be refused (changes nothing)."""
        self._table(table_id).check(self._dense(parts, table_id), count, computed_on, norm)

    # Agreement by dependency (several shards): each call's first `after` arguments are only what
    # it waits for (a failed one fails this call before it runs), the next `squares` are every
    # shard's squared norm (clipping: the global norm is their root sum), the rest are the parts.

    def squared_norm_after(self, table_id: str, grad_scale: float, after: int, *refs) -> float:
        return self.squared_norm(table_id, grad_scale, *refs[after:])

    def check_after(self, table_id: str, count: int, computed_on: int, squares: int, after: int, *refs) -> None:
        self.check(table_id, count, computed_on, _norm_of(refs[after:after + squares]), *refs[after + squares:])

    def apply_after(self, table_id: str, key: str, count, computed_on: int, ticket: int, squares: int,
                    after: int, *refs):
        """`apply` of a sync update once every shard's check passed (they are among the
        arguments): its gradients are all in, so the workers wait and their cores are free for
        it. The report carries the global norm where it was agreed (clipping). A `ticket` (not 0)
        has its outcome posted on this table's update board (update_board.py), for the workers of
        a step begun ahead; the report then names the board and the parameter block."""
        norm = _norm_of(refs[after:after + squares])
        try:
            published, report = self._apply(table_id, key, count, computed_on, norm, refs[after + squares:],
                                             idle_cores=True)
        except BaseException:
            self._post(table_id, ticket, FAILED)
            raise
        board = self._post(table_id, ticket, APPLIED)
        if norm is not None:
            report = {**report, "global_norm": norm}
        if board is not None and isinstance(published[1], BlockRef):
            report = {**report, "board": board, "block": published[1]}
        return published, report

    def _post(self, table_id: str, ticket: int, status: int) -> BlockRef | None:
        """Post `ticket`'s outcome on the table's board and ring the workers' bells; the board's
        ref, or None where there is none (no ticket, no lane, no room)."""
        if not ticket or self._lane is None or table_id not in self.tables:
            return None
        board = self._boards.get(table_id) or kept_board(self._lane, f"{table_id}-updates")
        if board is None:
            return None
        self._boards[table_id] = board
        board.post(ticket, status, self.tables[table_id].version)
        return board.ref

    def apply(self, table_id: str, key: str, count: int, computed_on: int, norm: float | None,
              *parts):
        """`(published, report)`: Ray stores the first as its own object for the workers."""
        return self._apply(table_id, key, count, computed_on, norm, parts, idle_cores=False)

    def _apply(self, table_id: str, key: str, count, computed_on: int, norm: float | None, parts,
               idle_cores: bool):
        table = self._table(table_id)
        pushes = parts[0]["key"] if parts and parts[0]["kind"] == "pushed" else None
        collection = None if pushes is None else self._pushes.collection(table_id, pushes)
        report = table.apply(key, self._dense(parts, table_id), count, computed_on, norm, idle_cores=idle_cores)
        if collection is not None:  # made: the pushed parts are no longer needed
            report.update(collection.figures())
            self._pushes.take(table_id, pushes)
        return self.published(table_id), report

    def _dense(self, parts, table_id: str | None = None) -> list:
        """Parts that arrived as shared blocks become dense parts (views into the blocks); their
        table rows travel beside the block. A `pushed` part stands for the buckets the workers
        pushed for its update key (gradient_push.py): the collected parts."""
        dense = []
        for part in parts:
            if part["kind"] == "pushed":
                collection = self._pushes.collection(table_id, part["key"])
                if not collection.complete() or collection.error is not None:
                    raise Unavailable("the workers' pushed gradients for this update are not all here",
                                      "gradients")
                dense.extend(collection.parts(self._table(table_id).params))
            elif part["kind"] == "shared":
                dense.append({"kind": "dense", "grads": self._lane.read(part["block"]), "rows": part.get("rows")})
            else:
                dense.append(part)
        return dense

    # ----- pushed updates: buckets arrive during the workers' backward pass (pushed_updates.py) --

    # `pushes` is one attempt's id at an update (pushed_updates.pushes_id), `key` the update's.

    def expect(self, table_id: str, pushes: str, key: str, shards: int, counts, computed_on: int,
               norm: float | None, apply_now: bool) -> None:
        """The update `key` is made of `shards` batch shards' pushes; with `apply_now` this server
        applies it the moment the last bucket is in, else it waits for `apply` by key."""
        collection = self._pushes.expect(table_id, pushes, key, shards, (counts, computed_on, norm), apply_now)
        self._complete_if_ready(table_id, pushes, collection)

    def push(self, table_id: str, pushes: str, shard: int, bucket: int, total: int | None, part: dict) -> None:
        """One bucket of batch shard `shard`'s gradient sums (`total`: buckets in all, on its last)."""
        try:
            grads = self._dense([part])[0]["grads"]
        except Exception as error:  # noqa: BLE001 - recorded for the trainer's wait
            self._pushes.finish(table_id, pushes, self._pushes.collection(table_id, pushes), error=error)
            return
        collection = self._pushes.push(table_id, pushes, shard, bucket, total, grads)
        self._complete_if_ready(table_id, pushes, collection)

    def outcome(self, table_id: str, pushes: str, timeout_s: float):
        """`(published, report)` of the pushed update once made (`(None, {"ready": True})` where it
        waits for `apply`). Runs on the server's waiting threads, not its update thread."""
        return PushedUpdates.wait(self._pushes.collection(table_id, pushes), timeout_s)

    def abandon(self, table_id: str, pushes: str) -> None:
        """Forget the pushes of an attempt the trainer gave up (a refused shard, a failed step)."""
        self._pushes.abandon(table_id, pushes, Unavailable("the update was abandoned", "gradients"))

    def _complete_if_ready(self, table_id: str, pushes: str, collection) -> None:
        if collection.done.is_set() or not collection.complete():
            return
        if not collection.apply_now:
            self._pushes.finish(table_id, pushes, collection, outcome=(None, {"ready": True}))
            return
        try:
            # every worker has pushed its last bucket: their cores are free for the update
            outcome = self._apply(table_id, collection.update_key, *collection.args, [pushed_part(pushes)],
                                  idle_cores=True)
        except Exception as error:  # noqa: BLE001 - refused or failed: the trainer's wait raises it
            self._pushes.finish(table_id, pushes, collection, error=error)
            return
        self._pushes.finish(table_id, pushes, collection, outcome=outcome)

    def pull_rows(self, table_id: str, ids_by_table: Mapping):
        """`{table: rows}` of this shard's `ids` of each table, at the current version."""
        table = self._table(table_id)
        if table.rows is None:
            raise NotFound("this model has no tables", "table")
        return table.rows.pull(ids_by_table)

    def dense_rows(self, table_id: str, name: str):
        """Every row this shard holds of table `name`, in local order (row local * S + shard)."""
        return self._table(table_id).rows.dense(name)

    def snapshot(self, table_id: str):
        return self._table(table_id).snapshot()

    def state(self, table_id: str):
        return self._table(table_id).state()

    def _table(self, table_id: str) -> ParameterTable:
        table = self.tables.get(table_id)
        if table is None:
            raise NotFound(f"no parameter table {table_id!r} on this server", "table")
        return table

    def table_row_range(self, table_id: str, name: str, start: int, stop: int):
        """The rows this shard holds of table `name` among rows [start, stop), in row order: a
        table read out one range at a time (table_stream.py), never whole."""
        table = self._table(table_id)
        if table.rows is None:
            raise NotFound("this model has no tables", "table")
        return table.rows.row_range(name, start, stop)
