"""The on-arrival step (async, bounded): each shard's gradient goes to the servers the moment it
arrives, as its own update (key `STEP/SHARD`), under the staleness rule the servers hold.

One update refused (non-finite) fails the step; the shards applied before and after it stay
applied, their keys in the servers' logs, so a retry of the step id applies them no second time.
The on-arrival modes never use shared memory: they apply while other shards still read.
"""

from __future__ import annotations

from gradserve_services.engine import Batch

from .config import StepResult, TrainerConfig
from .parameter_shards import ParameterShards
from .shard_runner import Failures, ShardInputs, ShardRunner
from .step_report import Clock, step_result
from .step_tasks import shard_tasks
from .steplog import update_key

__all__ = ["ArrivalSteps"]


class ArrivalSteps:
    def __init__(self, backend, config: TrainerConfig, runner: ShardRunner, shards: ParameterShards):
        self._backend = backend
        self._config = config
        self._runner = runner
        self._shards = shards

    def run(self, step: int, x, y, *, steps_run: int, num_workers: int) -> StepResult:
        try:
            return self._run(step, x, y, steps_run, num_workers)
        except BaseException:
            try:
                self._shards.republish()
            except Exception:  # noqa: BLE001 - a lost server: the step's own error says so
                pass
            raise

    def _run(self, step: int, x, y, steps_run: int, num_workers: int) -> StepResult:
        shards, runner, clock = self._shards, self._runner, Clock()
        batch = self._backend.put(x), self._backend.put(y)
        inputs = ShardInputs(shards.published, lambda: batch)
        clock.mark("put")
        rows = x.rows if isinstance(x, Batch) else x.shape[0]  # named inputs: a Batch
        tasks = shard_tasks(self._config, shards.table, shards.partition, rows, num_workers, steps_run)
        pending = {index: runner.dispatch(index, task, inputs) for index, task in enumerate(tasks)}
        stats, positions, report_futures, failures = [], [], [], Failures()
        while pending:
            indices = list(pending)
            index = indices[runner.next_done([pending[i] for i in indices])]
            call = pending.pop(index)
            try:
                shard_stats = runner.stats_of(call)  # `CallTimedOut` where it is the stuck one
            except Exception as error:  # noqa: BLE001 - classified by the backend
                pending[index] = runner.rerun(call, error, [], failures, num_workers)
                continue
            stats.append(shard_stats)
            positions.append(call.position)
            count, computed_on = shard_stats["count"], shard_stats["version"]
            grads_per_shard = [[part] for part in call.grads]
            norm = shards.agree(grads_per_shard, count, computed_on, self._config.optimizer.clip_norm)
            outputs = shards.apply(update_key(step, index), count, computed_on, norm, grads_per_shard)
            # later dispatches (re-runs) read the newest parameters, as every shard computed
            # after this one does
            shards.published = inputs.params = [output[0] for output in outputs]
            # the first shard's report describes the update; the others' only matter for errors:
            # all are fetched together below
            report_futures.extend(output[1] for output in outputs)
        clock.mark("gathered")
        reports = shards.get(report_futures)
        clock.mark("applied")
        first_shard_reports = reports[::len(shards.partition)]
        applied = [r for r in first_shard_reports if r["applied"]]
        norm = applied[-1]["grad_norm"] if applied else 0.0
        result = step_result(self._config.consistency, stats, first_shard_reports, clock, failures,
                             grad_norm=norm, positions=positions)
        shards.version = result.version
        return result
