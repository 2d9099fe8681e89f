"""`Trainer`: one training session's coordinator as its callers see it: steps exactly once per
step id (the step log), parameters, state and restore, resize, close (the table's lifecycle on the
parameter servers, the workers' pool reservation).

A step is run by its algorithm: `SyncSteps` (sync_step.py, one update from all shards) or
`ArrivalSteps` (arrival_step.py, async / bounded: each shard's gradient applied on arrival). Both
run their shards with one `ShardRunner` (shard_runner.py: dispatch, gather, re-run of a shard whose
worker was lost, so a sync step's result is the fault-free one) and address the parameter servers
through `ParameterShards` (parameter_shards.py: apply, the two phases of clipping, the finiteness
check before any shard applies); a lost call is classified in recovery.py.

A step whose loss, gradient or update is not finite (an overflow from finite inputs: an absurd
learning rate, a batch the model cannot take) is refused with FailedPrecondition and applies
nothing: workers refuse a non-finite loss, each server shard refuses an update that would leave a
parameter non-finite, and with several shards every shard is asked (`check`) before any applies.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import replace
from typing import Mapping

import numpy as np

from gradserve_services.engine import Model
from gradserve_services.errors import FailedPrecondition, InvalidArgument
from gradserve_services.optim import check_fits_dtype

from .arrival_step import ArrivalSteps
from .backend import Backend
from .config import StepResult, TrainerConfig
from .parameter_shards import ParameterShards
from .shard_runner import ShardRunner
from .shared import Attachments, BlockRef, SharedMemoryLane
from .sharding import partition_parameters
from .steplog import StepLog, step_number, update_key
from .local_step import LocalRounds
from .powersgd_step import PowerSGDSteps
from .sync_step import Begun, SyncSteps
from .two_phase import ForwardPhase, TwoPhaseSteps
from .table_lane import TableLane
from .table_stream import TableStream

__all__ = ["Trainer"]

STATE_FORMAT = 1


class Trainer:
    def __init__(self, backend: Backend, config: TrainerConfig, params: Mapping[str, np.ndarray]):
        self.config = config.validated()
        self._backend = backend
        self._model = Model(self.config.spec)
        # tables (if any) live row-sharded on every server shard; the rest is partitioned
        self._lane, params = TableLane.of(self._model, self.config, params)
        self._dtype = self._lane.dtype if self._lane else self._model.validate_parameters(params)
        check_fits_dtype(self.config.optimizer, self._dtype)
        self._table = uuid.uuid4().hex
        self._dense_names = [name for name in self._model.parameter_shapes()  # tables kept whole are dense too
                             if self._lane is None or name not in self._model.graph.tables]
        self._partition = partition_parameters({name: self._model.parameter_shapes()[name]
                                                for name in self._dense_names}, self.config.ps_shards)
        if self._lane is not None:  # every shard holds rows, whatever the dense partition
            self._partition += [[] for _ in range(self.config.ps_shards - len(self._partition))]
        self._lock = threading.Lock()  # one step (or state change) at a time per trainer
        self._log = StepLog(self.config.step_window)  # exactly-once: recent steps' results
        self._ahead: Begun | None = None  # the caller's next step, begun before its call (`step`)
        self._unclaimed: tuple | None = None  # (step, result) of one settled before its call came
        self._closed = False
        self._num_workers = self.config.num_workers
        # Sync steps may share memory with workers on this machine (see shared.py); the on-arrival
        # modes apply while other shards still read the parameters, so they never do.
        self._shared_memory = SharedMemoryLane(backend.shared_area) \
            if self.config.consistency == "sync" and backend.shared_area is not None else None
        self._shards = ParameterShards(backend, self._table, self._partition, self._shared_memory is not None,
                                       self.config.step_window, self._lane, self.config.call_timeout_s)
        runner = ShardRunner(backend, self._shards.check_inputs, self.config.call_timeout_s)
        if self.config.compression == "powersgd":  # sync only (config.py)
            self._steps = PowerSGDSteps(backend, self.config, self._model.parameter_shapes(),
                                        self._dtype, runner, self._shards, self._shared_memory)
        elif self.config.consistency == "sync":
            self._steps = SyncSteps(backend, self.config, self._dense_names, runner,
                                    self._shards, self._shared_memory)
        elif self.config.consistency == "local":
            self._steps = LocalRounds(backend, self.config, runner, self._shards)
        else:
            self._steps = ArrivalSteps(backend, self.config, runner, self._shards)
        self._two_phase = TwoPhaseSteps(self.config, self._model, self._shards)  # client-side losses
        backend.reserve_workers(self._table, self._num_workers)
        self._shards.create(params, self.config.optimizer.to_dict(), self._rule())

    # ----- public API ----------------------------------------------------------------------------

    def step(self, step_id, x, y, *, then: tuple | None = None) -> StepResult:
        """One step, exactly once per step id (an integer >= 0): an id recorded in the step log
        returns its recorded result with `duplicate=True`; an id at or below the highest one seen
        minus `config.step_window` is refused (FailedPrecondition), see steplog.py.

        `then=(step_id, x, y)`: the caller's next step, known already (a stream of steps). Where
        steps can overlap (sync, gradients returned when done, no tables: `SyncSteps.begins_ahead`)
        it is begun before this step is waited for: its workers are given this update's published
        parameters as arguments (or, where they map the servers' shared memory, wait for it on
        the servers' update boards: update_board.py), so they start the moment it is applied,
        with no round trip through this process, and the call for it finds it running. A step begun ahead is
        applied even if its call never comes (its caller sent it): any other call first waits for
        it, records it, and the first call for its id gets its result as no duplicate. Where this
        step fails, or a lost shard made its update be submitted again, the one begun ahead
        (which waited for that update) is dropped and runs afresh when called."""
        def run(step: int) -> StepResult:
            begun, self._ahead = self._ahead, None  # (`_once` left only one of this id)
            if begun is None:
                batch, targets = self._model.validate_batch(x, y, dtype=self._dtype)
                if then is None or not self._begins_ahead():
                    return self._steps.run(step, batch, targets, steps_run=self.steps_run,
                                           num_workers=self._num_workers)
                begun = self._steps.begin(step, batch, targets, steps_run=self.steps_run,
                                          num_workers=self._num_workers)
            ahead = self._begin_ahead(step, then, begun)
            try:
                result = self._steps.end(begun)
            except BaseException:
                if ahead is not None:
                    self._steps.abandon(ahead)
                raise
            if ahead is not None and (begun.resubmitted or result.version != ahead.computed_on):
                self._steps.abandon(ahead)
            elif ahead is not None:
                ahead.clock.rebase(time.perf_counter())
                self._ahead = ahead
            return result

        return self._once(step_id, run, claims_ahead=True)

    def _begins_ahead(self) -> bool:
        return isinstance(self._steps, SyncSteps) and self._steps.begins_ahead(self._num_workers)

    def _begin_ahead(self, step: int, then: tuple | None, begun: Begun) -> Begun | None:
        """The step `then` begun after `begun` (see `step`), or None where it cannot be: no next
        step, an id already recorded or refused, a batch this model refuses (its call will say
        why), or steps that do not overlap."""
        if then is None or not self._begins_ahead():
            return None
        try:
            following = step_number(then[0])
            if following == step or self._log.lookup(update_key(following)) is not None:
                return None
            batch, targets = self._model.validate_batch(then[1], then[2], dtype=self._dtype)
        except (InvalidArgument, FailedPrecondition):
            return None
        return self._steps.begin(following, batch, targets, steps_run=self.steps_run + 1,
                                 num_workers=self._num_workers, after=begun)

    def _settle_ahead(self) -> None:
        """Wait for the step begun ahead, if any, and record it; the first call for its id is
        answered with its result. One that fails is forgotten: its call, if it comes, runs it."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        try:
            result = self._steps.end(ahead)
        except Exception:  # noqa: BLE001 - what failed is met again by whatever runs next
            return
        self._log.record(update_key(ahead.step), result.to_record())
        self._unclaimed = (ahead.step, result)

    @contextlib.contextmanager
    def _quiet(self):
        """This trainer's lock, open, with no step in flight (one begun ahead is waited for)."""
        with self._lock:
            self._check_open()
            self._settle_ahead()
            yield

    def forward_step(self, step_id, x) -> ForwardPhase:
        """Phase one of a two-phase step (two_phase.py): the output at the current parameters,
        activations held under the step id; a recorded step id answers `duplicate`."""
        step = step_number(step_id)
        with self._quiet():
            if self._log.lookup(update_key(step)) is not None:
                return ForwardPhase(self.version, None, duplicate=True)
            held = self._two_phase.forward(step, x, steps_run=self.steps_run)
            return ForwardPhase(held.version, held.forward.output)

    def backward_step(self, step_id, output_gradient, loss: float, *, input_gradient: bool = False):
        """Phase two: the update from the caller's dL/d output, exactly once per step id (a
        recorded id returns its result with `duplicate=True`, as `step` does). With
        `input_gradient`, `(result, dL/dx by float input tensor)` through the same held forward
        (None for a recorded id: a repeat's answer carries no tensors)."""
        inputs = []
        result = self._once(step_id, lambda step: self._two_phase.backward(
            step, output_gradient, loss, input_gradients=inputs if input_gradient else None))
        return (result, inputs[0] if inputs else None) if input_gradient else result

    def _once(self, step_id, run, claims_ahead: bool = False) -> StepResult:
        """`run(step)` under the lock unless the step log answers the id; its result recorded.
        A step begun ahead is waited for first, unless `run` claims it (a `step` of its id)."""
        step = step_number(step_id)
        with self._lock:
            self._check_open()
            if self._ahead is not None and not (claims_ahead and self._ahead.step == step):
                self._settle_ahead()
            recorded = self._log.lookup(update_key(step))
            if recorded is not None:
                if self._unclaimed is not None and self._unclaimed[0] == step:  # settled ahead of its call
                    result, self._unclaimed = self._unclaimed[1], None
                    return result
                return replace(StepResult.from_record(recorded), duplicate=True)
            self._shards.refresh()  # after a call that outlived its bound
            result = run(step)
            self._log.record(update_key(step), result.to_record())
            return result

    def parameters(self) -> tuple[int, dict[str, np.ndarray]]:
        """`(version, params)`: copies the caller owns, in model order."""
        with self._quiet():
            snapshots = self._shards.copies()
            merged = {} if self._lane is None else self._lane.whole(  # from every shard's rows
                self._shards.get, self._backend.submit, self._shards.servers, self._table)
        for _, shard_params in snapshots:
            merged.update(shard_params)
        params = {name: np.array(merged[name], copy=True) for name in self._model.parameter_shapes()}
        return snapshots[0][0], params

    @contextlib.contextmanager
    def parameters_in_place(self):
        """`(version, params)` where the servers keep them, copied nowhere: read-only views (of
        the servers' shared-memory blocks, their in-process arrays, or the object store's copy);
        a model's tables as `TableStream`s, read from the servers a range of rows at a time as
        their parts are taken, never assembled. Valid inside the `with` block, during which this
        trainer runs no step, restore or close (its lock is held). For streaming them out
        (PullParameters) without a copy first."""
        with self._quiet():
            snapshots = self._shards.get(self._shards.published)
            attached = Attachments()  # mapped for this block only: a later restore unlinks them
            merged = {} if self._lane is None else self._lane.streams(  # tables: read a range at a time
                self._shards.get, self._backend.submit, self._shards.servers, self._table)
            for _, held in snapshots:
                merged.update(attached.arrays(held) if isinstance(held, BlockRef) else held)
            yield snapshots[0][0], {name: merged[name] if isinstance(merged[name], TableStream) else
                                    _read_only(merged[name]) for name in self._model.parameter_shapes()}

    def server_pids(self) -> list[int]:
        """Process ids of this trainer's parameter-server shards, in shard order (their memory is
        what a model's tables cost: `procfs.rss_bytes`)."""
        with self._quiet():
            return self._shards.get([self._backend.submit(server, "pid")[0] for server in self._shards.servers])

    def table_rows(self, name: str, ids: np.ndarray) -> tuple[int, np.ndarray]:
        """`(version, rows)`: rows `ids` of table `name` (InvalidArgument naming `table` / `ids`)."""
        shape = self._model.graph.tables.get(name)
        if shape is None:
            raise InvalidArgument(f"{name!r} is not a table of this model", "table")
        if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 1:
            raise InvalidArgument("ids must be a 1-D int64 array", "ids")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= shape[0]):
            raise InvalidArgument(f"ids must lie in [0, {shape[0]}) (the rows of {name})", "ids")
        with self._quiet():
            rows = self._lane.rows(self._shards.get, self._backend.submit, self._shards.servers,
                                   self._table, name, ids)
            return self._shards.version, rows

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """`(arrays, meta)` for a checkpoint: parameters, optimizer state, version, and the step
        log's mark and window (never more than `config.step_window` steps' records)."""
        with self._quiet():
            states = self._shards.states()
            mark, records = self._log.state()
            meta = {"format": STATE_FORMAT, "version": states[0][1]["version"],
                    "steps_run": self.steps_run, "step_mark": mark, "step_log": dict(records),
                    "table": states[0][1]}
        arrays = {}
        for shard_arrays, _ in states:
            arrays.update({key: np.array(value, copy=True) for key, value in shard_arrays.items()
                           if not key.startswith("rows/")})
        if self._lane is not None:  # each shard's stored rows, one after another
            arrays.update(TableLane.merge_states(states))
            meta["table_seed"] = self._lane.seed
        return arrays, meta

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        """Load a `state()`; replaces lost parameter servers (that is how a session recovers)."""
        if meta.get("format") != STATE_FORMAT:
            raise InvalidArgument(f"unknown state format {meta.get('format')!r}", "state.format")
        params = {name: arrays.get(f"param/{name}") for name in self._dense_names}
        missing = [name for name, value in params.items() if value is None]
        if missing:
            raise InvalidArgument(f"missing parameter {missing[0]!r}", f"state.param/{missing[0]}")
        if self._lane is not None:  # the tables' stored rows stand in for them
            params.update(self._lane.stored_rows(arrays))
        if self._model.validate_parameters(params, field_prefix="state.param") != self._dtype:
            raise InvalidArgument(f"parameters must be {self._dtype}", "state.param")
        with self._quiet():
            if self._lane is not None:  # rows never stored are made from the seed they started from
                self._lane.seed = int(meta.get("table_seed", self._lane.seed))
            self._shards.load(arrays, meta["table"])
            self._two_phase.clear()
            self._unclaimed = None
            self._shards.version = int(meta["version"])
            self._log = StepLog.from_state(meta.get("step_mark"), meta["step_log"],
                                           self.config.step_window, steps_recorded=int(meta["steps_run"]))

    def resize(self, num_workers: int) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise InvalidArgument(f"must be an integer >= 1, got {num_workers!r}", "num_workers")
        with self._quiet():
            self._backend.reserve_workers(self._table, num_workers)
            self._num_workers = num_workers

    @property
    def ahead_step(self) -> int | None:
        """The id of the step begun ahead of its call (`step`'s `then`), or None."""
        return None if self._ahead is None else self._ahead.step

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @property
    def version(self) -> int:
        return self._shards.version

    @property
    def steps_run(self) -> int:
        """Steps applied by this trainer's history, answers from the step log excluded (a
        checkpoint carries the count): the step log's count of the steps it recorded."""
        return self._log.steps_recorded

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._settle_ahead()
            self._closed = True
            backend = self._backend
            self._shards.drop()
            for worker in backend.workers(self._num_workers):
                backend.submit(worker, "forget", self._table)
            backend.release_workers(self._table)
            if self._shared_memory is not None:  # every block of this trainer, whoever wrote it
                self._shared_memory.remove_all(f"{self._table}-")

    def _rule(self) -> dict:
        if self.config.consistency == "async":
            return {"bound": None, "policy": self.config.stale_policy}
        bound = self.config.staleness if self.config.consistency == "bounded" else 0
        return {"bound": bound, "policy": self.config.stale_policy}

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the trainer is closed", "trainer")


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view
