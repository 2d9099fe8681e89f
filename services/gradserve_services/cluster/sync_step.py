"""The sync step: every shard's gradient, then one update from all of them (a barrier).

As in Ray's parameter-server example, `grads = [worker.compute(...) for worker in workers]` then
`params = servers.apply(*grads)`: one `compute` per worker (parameters travel as references to the
servers' last published snapshots, fetched once per version), one `apply` per server shard that
receives the workers' gradient references directly, one `get` of the workers' small stats and one
of the servers' small reports. Gradients and parameters never pass through this process; on one
machine (shared.py) the batch, the gradients and the parameters stay in shared memory.

With one server shard the apply is submitted before the workers finish, with their gradient
references as arguments: the server starts the moment the last gradient exists, without a round
trip through this process (and refuses a non-finite update by itself). If a worker is lost, that
apply fails on its missing argument without running, and is submitted again once the shard was
re-run. Several shards are first asked whether the update stays finite everywhere (and, with
clipping, for their part of the norm).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from gradserve_services.engine import Batch

from .config import StepResult, TrainerConfig
from .gradient_push import pushed_part
from .parameter_shards import ParameterShards
from .shard_runner import Failures, ShardCall, ShardInputs, ShardRunner
from .shared import SharedMemoryLane
from .signals import NoiseScale, add_products, noise_terms, shard_cosines
from .step_report import Clock, global_norm_of, step_result
from .step_tasks import shard_tasks
from .steplog import update_key

__all__ = ["SyncSteps"]


class SyncSteps:
    def __init__(self, backend, config: TrainerConfig, parameter_names: list[str], runner: ShardRunner,
                 shards: ParameterShards, shared_memory: SharedMemoryLane | None):
        self._backend = backend
        self._config = config
        self._parameter_names = parameter_names
        self._runner = runner
        self._shards = shards
        # this trainer's own lane into shared memory (for the batch); None: the object store only
        self._shared_memory = shared_memory
        self._noise_scale = NoiseScale()  # smoothed over this trainer's sync steps

    def run(self, step: int, x, y, *, steps_run: int, num_workers: int) -> StepResult:
        shards, key, clock = self._shards, update_key(step), Clock()
        rows = x.rows if isinstance(x, Batch) else x.shape[0]
        inputs = self._inputs(x, y)
        inputs.prepare(self._runner.shares_memory(num_workers))
        clock.mark("put")
        tasks = shard_tasks(self._config, shards.table, shards.partition, rows, num_workers,
                            steps_run, self._shared_memory is not None)
        pulls, pull_figures = ([()] * len(tasks), {}) if shards.lane is None else \
            shards.lane.prepare(self._backend, shards.servers, shards.table, x, tasks)  # table_lane.py
        if self._pushes_gradients():
            return self._run_pushed(key, clock, inputs, tasks, rows, steps_run, num_workers)
        calls = [self._runner.dispatch(position, task, inputs, rows=pulls[position])
                 for position, task in enumerate(tasks)]
        applying = self._apply(key, calls, steps_run, None) if len(shards.partition) == 1 else None
        failures = Failures()
        try:
            stats = self._runner.gather(calls, failures, num_workers)
        except BaseException:  # a refused shard (non-finite loss) or workers lost too often
            if applying is not None:
                shards.discard([future for output in applying for future in output])
            raise
        clock.mark("gathered")
        norm = None
        if applying is None or failures.reruns:
            if applying is not None:  # it failed on a lost gradient: submitted again
                shards.discard([output[1] for output in applying])
            grads_per_shard = _grads_per_shard(calls, len(shards.partition))
            norm = shards.agree(grads_per_shard, rows, shards.version, self._config.optimizer.clip_norm)
            applying = self._apply(key, calls, steps_run, norm)
        reports = shards.settle(applying)
        clock.mark("applied")
        if norm is None:
            norm = global_norm_of(reports)
        result = step_result("sync", stats, [reports[0]], clock, failures, grad_norm=norm,
                             positions=[call.position for call in calls])
        return self._finish(result, stats, reports, pull_figures)

    def _finish(self, result: StepResult, stats: list, reports: list, pull_figures: dict) -> StepResult:
        shards = self._shards
        shards.version = result.version
        if shards.lane is not None:
            result = replace(result, **shards.lane.fields(stats, reports, pull_figures))
        return replace(result, **self._gradient_signals(reports, [s["count"] for s in stats]))

    def _pushes_gradients(self) -> bool:
        """Whether this step's workers push their gradients in buckets during backward: plain
        dense gradients (no tables, no compression) on a backend whose servers can wait."""
        return (self._config.push_gradients and self._config.compression == "none"
                and self._shards.lane is None and getattr(self._backend, "pushes_gradients", False))

    def _run_pushed(self, key: str, clock: Clock, inputs: ShardInputs, tasks: list[dict], rows: int,
                    steps_run: int, num_workers: int) -> StepResult:
        """The step with gradients pushed during backward (gradient_push.py, pushed_updates.py):
        each server sums a bucket the moment every shard pushed it; one server applies when the
        last bucket is in, several first agree as on the other path, from the sums they hold."""
        shards = self._shards
        counts = self._counts(tasks, steps_run)
        alone = len(shards.partition) == 1
        push = {"key": key, "servers": shards.servers, "bucket_bytes": self._config.bucket_bytes}
        calls = [self._runner.dispatch(position, {**task, "push": push}, inputs)
                 for position, task in enumerate(tasks)]
        waiting = shards.expect_pushes(key, len(tasks), counts, alone)  # (the workers start first)
        failures = Failures()
        try:
            stats = self._runner.gather(calls, failures, num_workers)
        except BaseException:  # a refused shard or workers lost too often: nothing was applied
            shards.abandon_pushes(key, waiting)
            raise
        clock.mark("gathered")
        norm = None
        if alone:
            applying = waiting
        else:
            shards.get([output[1] for output in waiting])  # every server holds its sums
            grads_per_shard = [[pushed_part(key)] for _ in shards.partition]
            norm = shards.agree(grads_per_shard, rows, shards.version, self._config.optimizer.clip_norm)
            applying = shards.apply(key, counts, shards.version, norm, grads_per_shard)
        reports = shards.settle(applying)
        clock.mark("applied")
        if norm is None:
            norm = global_norm_of(reports)
        result = step_result("sync", stats, [reports[0]], clock, failures, grad_norm=norm,
                             positions=[call.position for call in calls])
        result = replace(result, timings={**result.timings, **{  # the slowest server's
            name: max(r.get(f"{name}_ms", 0.0) for r in reports) for name in ("reduced", "overlapped")}})
        return self._finish(result, stats, reports, {})

    def _counts(self, tasks: list[dict], steps_run: int):
        # one count per part: the servers then measure the gradient signals (signals.py)
        counts = [task["stop"] - task["start"] for task in tasks]
        return counts if steps_run % self._config.signals_every == 0 else sum(counts)

    def _apply(self, key: str, calls: list[ShardCall], steps_run: int, norm) -> list:
        return self._shards.apply(key, self._counts([call.task for call in calls], steps_run), self._shards.version, norm,
                                  _grads_per_shard(calls, len(self._shards.partition)))

    def _inputs(self, x, y) -> ShardInputs:
        """The step's inputs: the batch as one block for the workers that map shared memory
        (arrays only), through the object store for the others, who also get the servers to ask
        for copies of the parameters published as blocks."""
        backend, lane, shards = self._backend, self._shared_memory, self._shards
        shared_batch = None
        if lane is not None and isinstance(x, np.ndarray):
            def shared_batch():
                return lane.put(f"{shards.table}-batch", {"x": x, "y": y})
        return ShardInputs(shards.published, lambda: (backend.put(x), backend.put(y)),
                           shared_batch=shared_batch, servers=None if lane is None else shards.servers)

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
                "update_ratios": {name: ratios[name] for name in self._parameter_names}}


def _grads_per_shard(calls: list[ShardCall], server_shards: int) -> list[list]:
    """`[k]`: every call's gradient part for server shard k."""
    return [[call.grads[k] for call in calls] for k in range(server_shards)]
