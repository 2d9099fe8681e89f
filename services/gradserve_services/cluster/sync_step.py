"""The sync step: every shard's gradient, then one update from all of them (a barrier).

As in Ray's parameter-server example, `grads = [worker.compute(...) for worker in workers]` then
`params = servers.apply(*grads)`: one `compute` per worker (parameters travel as the servers' last
published snapshots: a block reference of a few bytes, given by value to a worker that maps the
shared memory, else a reference it fetches once per version), one `apply` per server shard that
receives the workers' gradient references directly, one `get` of the workers' small stats and one
of the servers' small reports. Gradients and parameters never pass through this process; on one
machine (shared.py) the batch, the gradients and the parameters stay in shared memory.

The update is submitted before the workers finish, with their gradient references as arguments:
a server starts the moment the last gradient exists, without a round trip through this process.
One server shard refuses a non-finite update by itself; several each check their part first (and,
with clipping, give their part of the norm), and every apply takes all the checks as arguments, so
none runs unless all passed (ParameterShards.update). If a worker is lost, the update fails on its
missing argument without running, and is submitted again once the shard was re-run.

Where the workers push their gradients during backward instead (`_run_pushed`), the servers hold
the sums when the last bucket arrives; the same update is made from them.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from gradserve_services.engine import Batch

from .config import StepResult, TrainerConfig
from .gradient_push import pushed_part
from .parameter_shards import ParameterShards
from .pushed_updates import pushes_id
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
        if self._pushes_gradients(num_workers):
            return self._run_pushed(key, clock, inputs, tasks, rows, steps_run, num_workers)
        calls = [self._runner.dispatch(position, task, inputs, rows=pulls[position])
                 for position, task in enumerate(tasks)]
        applying = self._update(key, calls, rows, steps_run)
        failures = Failures()
        try:
            stats = self._runner.gather(calls, failures, num_workers)
        except BaseException:  # a refused shard (non-finite loss) or workers lost too often
            shards.discard_update(applying)
            raise
        clock.mark("gathered")
        if failures.reruns:  # it failed on a lost gradient: submitted again, with the re-runs'
            shards.discard_update(applying)
            applying = self._update(key, calls, rows, steps_run)
        reports = shards.settle(applying)
        clock.mark("applied")
        result = step_result("sync", stats, [reports[0]], clock, failures, grad_norm=_norm(reports),
                             positions=[call.position for call in calls])
        return self._finish(result, stats, reports, pull_figures)

    def _finish(self, result: StepResult, stats: list, reports: list, pull_figures: dict) -> StepResult:
        shards = self._shards
        shards.version = result.version
        if shards.lane is not None:
            result = replace(result, **shards.lane.fields(stats, reports, pull_figures))
        return replace(result, **self._gradient_signals(reports, [s["count"] for s in stats]))

    def _pushes_gradients(self, num_workers: int) -> bool:
        """Whether this step's workers push their gradients in buckets during backward: plain
        dense gradients (no tables, no compression) on a backend whose servers can wait, where the
        config asks for it (unset: where this machine, the servers', has a core beyond the workers)."""
        wanted = self._config.push_gradients
        if wanted is None:
            wanted = len(os.sched_getaffinity(0)) > num_workers
        return (wanted and self._config.compression == "none"
                and self._shards.lane is None and getattr(self._backend, "pushes_gradients", False))

    def _run_pushed(self, key: str, clock: Clock, inputs: ShardInputs, tasks: list[dict], rows: int,
                    steps_run: int, num_workers: int) -> StepResult:
        """The step with gradients pushed during backward (gradient_push.py, pushed_updates.py):
        each server sums a bucket the moment every shard pushed it; one server applies when the
        last bucket is in; several check and apply as on the other path, from the sums they hold,
        each server's check waiting for its sums."""
        shards = self._shards
        counts = self._counts(tasks, steps_run)
        alone = len(shards.partition) == 1
        pushes = pushes_id(key)  # this attempt's: an abandoned one's late pushes stay out of the next
        push = {"key": pushes, "servers": shards.servers, "bucket_bytes": self._config.bucket_bytes}
        calls = [self._runner.dispatch(position, {**task, "push": push}, inputs)
                 for position, task in enumerate(tasks)]
        waiting = shards.expect_pushes(pushes, key, len(tasks), counts, alone)  # (the workers start first)
        applying = waiting if alone else shards.update(  # each server's checks wait for its sums
            key, counts, rows, shards.version, self._config.optimizer.clip_norm,
            [[pushed_part(pushes)] for _ in shards.partition], after=[[output[1]] for output in waiting])
        failures = Failures()
        try:
            stats = self._runner.gather(calls, failures, num_workers)
        except BaseException:  # a refused shard or workers lost too often: nothing was applied
            shards.abandon_pushes(pushes, waiting)
            if not alone:
                shards.discard_update(applying)
            raise
        clock.mark("gathered")
        reports = shards.settle(applying)
        if not alone:
            shards.discard([output[0] for output in waiting])  # "complete": read, nothing to keep
        clock.mark("applied")
        result = step_result("sync", stats, [reports[0]], clock, failures, grad_norm=_norm(reports),
                             positions=[call.position for call in calls])
        result = replace(result, timings={**result.timings, **{  # the slowest server's
            name: max(r.get(f"{name}_ms", 0.0) for r in reports) for name in ("reduced", "overlapped")}})
        return self._finish(result, stats, reports, {})

    def _counts(self, tasks: list[dict], steps_run: int):
        # one count per part: the servers then measure the gradient signals (signals.py)
        counts = [task["stop"] - task["start"] for task in tasks]
        return counts if steps_run % self._config.signals_every == 0 else sum(counts)

    def _update(self, key: str, calls: list[ShardCall], rows: int, steps_run: int) -> list:
        """The update submitted with the workers' gradient futures as arguments: it starts the
        moment the last gradient exists (ParameterShards.update), without a round trip here."""
        shards = self._shards
        return shards.update(key, self._counts([call.task for call in calls], steps_run), rows, shards.version,
                             self._config.optimizer.clip_norm, _grads_per_shard(calls, len(shards.partition)))

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


def _norm(reports: list[dict]) -> float:
    """The update's global gradient norm: agreed by the shards (clipping), else from each's slice."""
    return reports[0]["global_norm"] if "global_norm" in reports[0] else global_norm_of(reports)


def _grads_per_shard(calls: list[ShardCall], server_shards: int) -> list[list]:
    """`[k]`: every call's gradient part for server shard k."""
    return [[call.grads[k] for call in calls] for k in range(server_shards)]
