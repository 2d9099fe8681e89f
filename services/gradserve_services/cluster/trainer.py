"""The step coordinator: split a batch into shards, dispatch them, gather, retry, apply.

Per sync step: one `put` for x and one for y, one `compute` call per worker (parameters travel as
references to the parameter servers' last returned snapshots, which workers fetch once per version),
one `get` of the workers' small stats, one `apply` per parameter-server shard that receives the
workers' gradient references directly, one `get` of the servers' small reports. Gradients and
parameters never pass through this process. On one machine (shared.py) the batch, the gradients and
the parameters stay in shared memory and those references are descriptors of a few bytes.

A worker lost mid-step (its process killed, its node gone) is replaced in the pool and its shard is
re-run on a live worker with the same inputs, so a sync step's result is the fault-free one.

A step whose loss, gradient or update is not finite (an overflow from finite inputs: an absurd
learning rate, a batch the model cannot take) is refused with FailedPrecondition and applies
nothing: workers refuse a non-finite loss, each server shard refuses an update that would leave a
parameter non-finite, and with several shards every shard is asked (`check`) before any applies.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from gradserve_services.engine import Model
from gradserve_services.errors import FailedPrecondition, InvalidArgument, ParameterServerLost, Unavailable
from gradserve_services.optim import check_fits_dtype

from .backend import Backend
from .config import StepResult, TrainerConfig
from .shared import remove_prefixed, write_block
from .sharding import partition_parameters, split_rows
from .signals import NoiseScale, add_products, compute_spread, noise_terms, shard_cosines, slowest_position
from .steplog import StepLog, step_number, update_key
from .worker import AreaNotVisible

__all__ = ["Trainer"]

# How many times one shard may be re-run after losing its worker before the step gives up.
MAX_SHARD_ATTEMPTS = 4
STATE_FORMAT = 1


def _server_lost(error) -> ParameterServerLost:
    return ParameterServerLost("a parameter server was lost; restore this trainer from its last "
                               f"checkpoint ({error})")


@dataclass
class _ShardCall:
    position: int  # worker pool position running it
    task: dict
    parts: list  # one gradient future per parameter-server shard
    stats: object  # future of the small stats dict


class Trainer:
    def __init__(self, backend: Backend, config: TrainerConfig, params: Mapping[str, np.ndarray]):
        self.config = config.validated()
        self._backend = backend
        self._model = Model(self.config.spec)
        self._dtype = self._model.validate_parameters(params)
        check_fits_dtype(self.config.optimizer, self._dtype)
        self._table = uuid.uuid4().hex
        self._partition = partition_parameters(self._model.parameter_shapes(),
                                               self.config.ps_shards)
        self._lock = threading.Lock()  # one step (or state change) at a time per trainer
        self._log = StepLog(self.config.step_window)  # exactly-once: recent steps' results
        self._steps_run = 0
        self._version = 0
        self._closed = False
        self._num_workers = self.config.num_workers
        # Sync steps may share memory with workers on this machine (see shared.py); the on-arrival
        # modes apply while other shards still read the parameters, so they never do.
        self._area = backend.shared_area if self.config.consistency == "sync" else None
        # Batches go through the area too once every worker of the last step could see it.
        self._workers_near = False
        self._batch_blocks: dict = {}
        self._noise_scale = NoiseScale()  # smoothed over this trainer's sync steps
        backend.reserve_workers(self._table, self._num_workers)
        servers = backend.servers(len(self._partition))
        self._snapshots = [
            backend.submit(server, "create_table", self._table, {n: params[n] for n in names},
                           self.config.optimizer.to_dict(), self._rule(), self._area,
                           self.config.step_window)[0]
            for server, names in zip(servers, self._partition)
        ]
        self._get_from_servers(self._snapshots)

    # ----- public API ----------------------------------------------------------------------------

    def step(self, step_id, x, y) -> StepResult:
        """One step, exactly once per step id (an integer >= 0): an id recorded in the step log
        returns its recorded result with `duplicate=True`; an id at or below the highest one seen
        minus `config.step_window` is refused (FailedPrecondition), see steplog.py."""
        step = step_number(step_id)
        with self._lock:
            self._check_open()
            recorded = self._log.lookup(update_key(step))
            if recorded is not None:
                return replace(StepResult.from_record(recorded), duplicate=True)
            x, y = self._model.validate_batch(x, y, dtype=self._dtype)
            if self.config.consistency == "sync":
                result = self._step_sync(step, x, y)
            else:
                result = self._step_on_arrival(step, x, y)
            self._log.record(update_key(step), result.to_record())
            self._steps_run += 1
            self._version = result.version
            return result

    def parameters(self) -> tuple[int, dict[str, np.ndarray]]:
        """`(version, params)`: copies the caller owns, in model order."""
        with self._lock:
            self._check_open()
            if self._area is None:
                snapshots = self._get_from_servers(self._snapshots)
            else:  # the published blocks change in place: ask for copies
                snapshots = self._get_from_servers(
                    [self._backend.submit(server, "snapshot", self._table)[0]
                     for server in self._backend.servers(len(self._partition))])
        merged = {}
        for _, shard_params in snapshots:
            merged.update(shard_params)
        params = {name: np.array(merged[name], copy=True) for name in self._model.parameter_shapes()}
        return snapshots[0][0], params

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """`(arrays, meta)` for a checkpoint: parameters, optimizer state, version, and the step
        log's mark and window (never more than `config.step_window` steps' records)."""
        with self._lock:
            self._check_open()
            servers = self._backend.servers(len(self._partition))
            states = self._get_from_servers(
                [self._backend.submit(server, "state", self._table)[0] for server in servers])
            mark, records = self._log.state()
            meta = {"format": STATE_FORMAT, "version": states[0][1]["version"],
                    "steps_run": self._steps_run, "step_mark": mark, "step_log": dict(records),
                    "table": states[0][1]}
        arrays = {}
        for shard_arrays, _ in states:
            arrays.update({key: np.array(value, copy=True) for key, value in shard_arrays.items()})
        return arrays, meta

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        """Load a `state()`; replaces lost parameter servers (that is how a session recovers)."""
        if meta.get("format") != STATE_FORMAT:
            raise InvalidArgument(f"unknown state format {meta.get('format')!r}", "state.format")
        params = {name: arrays.get(f"param/{name}") for name in self._model.parameter_shapes()}
        missing = [name for name, value in params.items() if value is None]
        if missing:
            raise InvalidArgument(f"missing parameter {missing[0]!r}", f"state.param/{missing[0]}")
        if self._model.validate_parameters(params, field_prefix="state.param") != self._dtype:
            raise InvalidArgument(f"parameters must be {self._dtype}", "state.param")
        with self._lock:
            self._check_open()
            snapshots = []
            for position, names in enumerate(self._partition):
                shard_arrays = {key: value for key, value in arrays.items()
                                if key.split("/")[1] in names}
                snapshots.append(self._load_table(position, shard_arrays, meta["table"], names))
            self._snapshots = snapshots
            self._version = int(meta["version"])
            self._steps_run = int(meta["steps_run"])
            self._log = StepLog.from_state(meta.get("step_mark"), meta["step_log"],
                                           self.config.step_window)

    def resize(self, num_workers: int) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise InvalidArgument(f"must be an integer >= 1, got {num_workers!r}", "num_workers")
        with self._lock:
            self._check_open()
            self._backend.reserve_workers(self._table, num_workers)
            self._num_workers = num_workers
            self._workers_near = False

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @property
    def version(self) -> int:
        return self._version

    @property
    def steps_run(self) -> int:
        """Steps applied by this trainer's history, answers from the step log excluded (a
        checkpoint carries the count)."""
        return self._steps_run

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            backend = self._backend
            for server in backend.servers(len(self._partition)):
                backend.submit(server, "drop_table", self._table)
            for worker in backend.workers(self._num_workers):
                backend.submit(worker, "forget", self._table)
            backend.release_workers(self._table)
            if self._area is not None:  # every block of this trainer, whoever wrote it
                remove_prefixed(self._area[0], f"{self._table}-")

    # ----- steps ---------------------------------------------------------------------------------

    def _step_sync(self, step: int, x, y) -> StepResult:
        key = update_key(step)
        clock = _Clock()
        x_ref, y_ref = self._batch_refs(x, y)
        clock.mark("put")
        calls = self._dispatch_all(x.shape[0], x_ref, y_ref)
        servers = self._backend.servers(len(self._partition))
        total = x.shape[0]
        # With one server shard the apply is submitted before the workers finish, with their
        # gradient references as arguments: the server starts the moment the last gradient exists,
        # without a round trip through this process (and refuses a non-finite update by itself).
        # If a worker is lost, that apply fails on its missing argument without running, and is
        # submitted again below after the shard is re-run. Several shards are first asked whether
        # the update stays finite everywhere (and, with clipping, for their part of the norm).
        early = self._submit_apply(servers, key, calls, None) if len(servers) == 1 else None
        try:
            stats, failures = self._gather(calls, x, y, x_ref, y_ref)
        except BaseException:  # a refused shard (non-finite loss) or workers lost too often
            if early is not None:
                self._discard([future for output in early for future in output])
            raise
        clock.mark("gathered")
        self._workers_near = self._area is not None and failures == [0, 0] and \
            all(s.get("sees_area") for s in stats)
        norm = None
        if early is not None and failures[1] == 0:
            outputs = early
        else:
            if early is not None:
                self._discard([output[1] for output in early])
            groups = [[call.parts[k] for call in calls] for k in range(len(servers))]
            norm = self._clipping_norm(servers, groups, total)
            self._check_all(servers, groups, total, self._version, norm)
            outputs = self._submit_apply(servers, key, calls, norm)
        try:
            reports = self._get_from_servers([output[1] for output in outputs])
        except BaseException:  # refused: the last published parameters stay the workers' input
            self._discard([output[0] for output in outputs])
            raise
        self._snapshots = [output[0] for output in outputs]
        clock.mark("applied")
        if norm is None:
            norm = math.sqrt(sum(report["grad_norm"] ** 2 for report in reports))
        result = self._result(stats, [reports[0]], clock, failures, grad_norm=norm,
                              positions=[call.position for call in calls])
        return replace(result, **self._gradient_signals(reports, [s["count"] for s in stats]))

    def _gradient_signals(self, reports, shard_counts) -> dict:
        """StepResult fields from the server shards' products (each holds a parameter slice)."""
        if not all("products" in report for report in reports):  # not measured, or nothing applied
            return {"noise_scale": self._noise_scale.value}
        products = add_products([report["products"] for report in reports])
        ratios = {}
        for report in reports:
            ratios.update(report["update_ratios"])
        noise_scale = self._noise_scale.update(noise_terms(products, shard_counts))
        return {"noise_scale": noise_scale, "shard_cosines": shard_cosines(products),
                "update_ratios": {name: ratios[name] for name in self._model.parameter_shapes()}}

    def _batch_refs(self, x, y):
        """`(x_ref, y_ref)`: one shared block holding both (y_ref None) while every worker is near,
        else two object-store entries."""
        if self._area is None or not self._workers_near:
            return self._backend.put(x), self._backend.put(y)
        folder, token = self._area
        try:
            return write_block(folder, token, f"{self._table}-batch", {"x": x, "y": y}, self._batch_blocks), None
        except OSError:  # no room in the tmpfs
            return self._backend.put(x), self._backend.put(y)

    def _submit_apply(self, servers, key, calls, norm):
        # one count per part: the servers then measure the gradient signals (signals.py)
        counts = [call.task["stop"] - call.task["start"] for call in calls]
        if self._steps_run % self.config.signals_every:
            counts = sum(counts)
        return [self._backend.submit(server, "apply", self._table, key, counts, self._version, norm,
                                     *[call.parts[k] for call in calls], num_returns=2)
                for k, server in enumerate(servers)]

    def _discard(self, futures) -> None:
        """Read failed futures so their errors count as handled."""
        for future in futures:
            try:
                self._backend.get(future)
            except Exception:  # noqa: BLE001 - expected: the call lost an argument
                pass

    def _step_on_arrival(self, step: int, x, y) -> StepResult:
        """async / bounded: each shard's gradient goes to the servers the moment it arrives.

        Each shard's gradient is its own update: one refused (non-finite) fails the step, and the
        shards applied before and after it stay applied, their keys in the servers' logs, so a
        retry of the step id applies them no second time."""
        try:
            return self._step_each_shard(step, x, y)
        except BaseException:
            try:
                self._republish()
            except Exception:  # noqa: BLE001 - a lost server: the step's own error says so
                pass
            raise

    def _republish(self) -> None:
        """After a failed on-arrival step: the servers' current parameters and version become the
        workers' input (some shards' applies may have failed, others succeeded)."""
        servers = self._backend.servers(len(self._partition))
        published = [self._backend.submit(server, "published", self._table)[0] for server in servers]
        versions = [version for version, _ in self._get_from_servers(published)]
        self._snapshots = published
        self._version = max(versions)

    def _step_each_shard(self, step: int, x, y) -> StepResult:
        clock = _Clock()
        x_ref, y_ref = self._backend.put(x), self._backend.put(y)
        clock.mark("put")
        pending = dict(enumerate(self._dispatch_all(x.shape[0], x_ref, y_ref)))
        servers = self._backend.servers(len(self._partition))
        stats, positions, report_futures, failures = [], [], [], [0, 0]
        while pending:
            indices = list(pending)
            index = indices[self._backend.wait_one([pending[i].stats for i in indices])]
            call = pending.pop(index)
            try:
                shard_stats = self._backend.get(call.stats)
            except Exception as error:  # noqa: BLE001 - classified by the backend
                pending[index] = self._rerun(call, error, [], x_ref, y_ref, failures)
                continue
            stats.append(shard_stats)
            positions.append(call.position)
            count = shard_stats["count"]
            groups = [[part] for part in call.parts]
            norm = self._clipping_norm(servers, groups, count)
            self._check_all(servers, groups, count, shard_stats["version"], norm)
            outputs = [self._backend.submit(server, "apply", self._table, update_key(step, index), count,
                                            shard_stats["version"], norm, call.parts[k],
                                            num_returns=2)
                       for k, server in enumerate(servers)]
            self._snapshots = [output[0] for output in outputs]
            report_futures.append(outputs[0][1])
            # the other shards' reports only matter for errors: fetch them together below
            report_futures.extend(output[1] for output in outputs[1:])
        clock.mark("gathered")
        reports = self._get_from_servers(report_futures)
        clock.mark("applied")
        first_shard_reports = reports[::len(servers)]
        applied = [r for r in first_shard_reports if r["applied"]]
        norm = applied[-1]["grad_norm"] if applied else 0.0
        return self._result(stats, first_shard_reports, clock, failures, grad_norm=norm,
                            positions=positions)

    # ----- workers -------------------------------------------------------------------------------

    def _dispatch_all(self, rows: int, x_ref, y_ref) -> list[_ShardCall]:
        shards = split_rows(rows, self._num_workers)
        seed = (self.config.seed * 1_000_003 + self._steps_run) % 2**31
        calls = []
        for position, (start, stop) in enumerate(shards):
            task = {"spec": self.config.spec, "table": self._table, "start": start, "stop": stop,
                    "finite_only": True,
                    "partition": self._partition, "micro_batch_size": self.config.micro_batch_size,
                    "seed": seed, "compression": self.config.compression,
                    "topk_fraction": self.config.topk_fraction, "slot": position}
            if self._area is not None:
                task["area"] = self._area
                if not self._workers_near:  # a worker that cannot see the area asks them for copies
                    task["servers"] = self._backend.servers(len(self._partition))
            calls.append(self._dispatch(position, task, x_ref, y_ref))
        return calls

    def _dispatch(self, position: int, task: dict, x_ref, y_ref) -> _ShardCall:
        worker = self._backend.workers(position + 1)[position]
        futures = self._backend.submit(worker, "compute", task, list(self._snapshots), x_ref, y_ref,
                                       num_returns=len(self._partition) + 1)
        return _ShardCall(position, task, futures[:-1], futures[-1])

    def _gather(self, calls: list[_ShardCall], x, y, x_ref, y_ref):
        """Every shard's stats, re-running shards whose worker was lost. Returns (stats, failures)
        with failures = [workers lost, shards re-run]."""
        stats = [None] * len(calls)
        failures = [0, 0]
        while any(s is None for s in stats):
            for index, call in enumerate(calls):
                if stats[index] is not None:
                    continue
                try:
                    stats[index] = self._backend.get(call.stats)
                except Exception as error:  # noqa: BLE001 - classified by the backend
                    if y_ref is None:  # re-runs may land anywhere: they get the batch by store
                        x_ref, y_ref = self._backend.put(x), self._backend.put(y)
                    if "area" in call.task:  # ... and the servers, to ask for parameter copies
                        call.task = {**call.task, "servers": self._backend.servers(len(self._partition))}
                    if isinstance(self._backend.cause(error), AreaNotVisible):
                        failures[1] += 1  # a re-run on the same worker, with the batch by store
                        calls[index] = self._dispatch(call.position, call.task, x_ref, y_ref)
                        continue
                    healthy = [c.position for c, s in zip(calls, stats) if s is not None]
                    calls[index] = self._rerun(call, error, healthy, x_ref, y_ref, failures)
        return stats, failures

    def _rerun(self, call: _ShardCall, error, healthy: list[int], x_ref, y_ref, failures):
        """Replace the lost worker and run the shard again: on a worker known to be alive if there
        is one (it is warm), else on another pool member, else on the replacement."""
        if not self._backend.is_lost(error):
            raise self._backend.cause(error) from None
        lost = self._backend.workers(self._num_workers)[call.position]
        if not self._backend.died(error, lost):
            # A shard also fails when the parameters it reads are gone with their server: that is
            # no worker's fault, and re-running cannot help. ParameterServerLost if so.
            # (Not asked when the worker itself died: the question waits in the server's queue
            # behind the step's early apply, i.e. until every other shard is done.)
            if not self._servers_alive():
                raise _server_lost(error)
        attempts = call.task.get("attempt", 0) + 1
        if attempts >= MAX_SHARD_ATTEMPTS:
            raise Unavailable(f"shard {call.task['start']}:{call.task['stop']} lost its worker "
                              f"{attempts} times: {error}", "workers")
        replaced = self._backend.replace_worker(call.position, lost) is not lost
        failures[0] += int(replaced)
        failures[1] += 1
        others = [p for p in range(self._num_workers) if p != call.position]
        candidates = healthy or others or [call.position]
        position = candidates[attempts % len(candidates)]
        return self._dispatch(position, {**call.task, "attempt": attempts}, x_ref, y_ref)

    # ----- parameter servers ---------------------------------------------------------------------

    def _clipping_norm(self, servers, part_groups, count) -> float | None:
        """With clipping over several server shards the global norm is needed before any shard
        updates: phase one asks each shard for its squared norm. Otherwise each shard computes it
        while updating (None)."""
        if self.config.optimizer.clip_norm is None or len(servers) == 1:
            return None
        squares = self._get_from_servers([
            self._backend.submit(server, "squared_norm", self._table, 1.0 / count, *parts)[0]
            for server, parts in zip(servers, part_groups)])
        return math.sqrt(sum(squares))

    def _check_all(self, servers, part_groups, count, computed_on, norm) -> None:
        """With several server shards, each is asked whether its part of the update stays finite
        (FailedPrecondition if not) before any applies, so a refused update changes no shard. One
        shard decides while applying."""
        if len(servers) > 1:
            self._get_from_servers([
                self._backend.submit(server, "check", self._table, count, computed_on, norm, *parts)[0]
                for server, parts in zip(servers, part_groups)])

    def _get_from_servers(self, futures):
        try:
            return self._backend.get(futures)
        except Exception as error:  # noqa: BLE001 - classified by the backend
            if self._backend.is_lost(error):
                if self._servers_alive():  # what was lost is an input: a gradient, with its node
                    raise Unavailable("a shard's gradient was lost with its worker before the "
                                      "parameter servers read it; resend the step (its step id "
                                      f"applies at most once) ({error})", "workers") from None
                raise _server_lost(error) from None
            raise self._backend.cause(error) from None

    def _servers_alive(self) -> bool:
        try:
            self._backend.get([self._backend.submit(server, "pid")[0]
                               for server in self._backend.servers(len(self._partition))])
            return True
        except Exception as error:  # noqa: BLE001 - classified by the backend
            if self._backend.is_lost(error):
                return False
            raise

    def _load_table(self, position: int, arrays, table_meta, names):
        server = self._backend.servers(position + 1)[position]
        for _ in range(2):
            future = self._backend.submit(server, "load_table", self._table, arrays, table_meta,
                                          names, self._area, self.config.step_window)[0]
            try:
                self._backend.get(future)
                return future
            except Exception as error:  # noqa: BLE001 - classified by the backend
                if not self._backend.is_lost(error):
                    raise self._backend.cause(error) from None
                server = self._backend.replace_server(position, server)
        raise ParameterServerLost("could not start a parameter server")

    def _rule(self) -> dict:
        if self.config.consistency == "async":
            return {"bound": None, "policy": self.config.stale_policy}
        bound = 0 if self.config.consistency == "sync" else self.config.staleness
        return {"bound": bound, "policy": self.config.stale_policy}

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the trainer is closed", "trainer")

    # ----- reporting -----------------------------------------------------------------------------

    def _result(self, stats, reports, clock: "_Clock", failures, *, grad_norm, positions) -> StepResult:
        samples = sum(s["count"] for s in stats)
        fetch = max(s["fetch_ms"] for s in stats)
        compute = max(s["compute_ms"] for s in stats)
        workers_phase = clock.between("put", "gathered")
        applied = [r for r in reports if r["applied"]]
        timings = {
            "broadcast": clock.between(None, "put") + fetch,
            "compute": compute,
            "gather": max(workers_phase - fetch - compute, 0.0),
            "apply": clock.between("gathered", "applied"),
            "total": clock.between(None, "applied"),
            "server_apply": sum(r.get("apply_ms", 0.0) for r in reports),
        }
        return StepResult(
            loss=sum(s["loss_sum"] for s in stats) / samples,
            version=max(r["version"] for r in reports),
            applied=bool(applied),
            timings=timings,
            samples=samples,
            grad_norm=float(grad_norm),
            lr=applied[-1]["lr"] if applied else 0.0,
            staleness=tuple(r["staleness"] for r in reports),
            updates_applied=len(applied),
            updates_dropped=len(reports) - len(applied),
            worker_failures=failures[0],
            retries=failures[1],
            bytes_raw=sum(s["bytes_raw"] for s in stats),
            bytes_compressed=sum(s["bytes_sent"] for s in stats),
            worker_compute_ms=tuple(s["compute_ms"] for s in stats),
            mode=self.config.consistency,
            compute_spread=compute_spread([s["compute_ms"] for s in stats]),
            slowest_worker=slowest_position(positions, [s["compute_ms"] for s in stats]),
        )


class _Clock:
    def __init__(self):
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def between(self, first: str | None, second: str) -> float:
        begin = self.start if first is None else self.marks[first]
        return (self.marks[second] - begin) * 1e3
