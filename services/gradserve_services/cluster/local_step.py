"""The local-SGD step ("local" consistency): a round of H inner steps on every worker, then one outer
update from their parameter deltas (local_round.py has the math and why).

A round runs like a sync step, with the workers' pseudo-gradients in place of gradients: one
`compute` per worker (each is sent only the rows it trains on, so a far worker's link carries its
own data and nothing else), one `apply` per server shard with the workers' delta references, which
the outer optimizer applies to their sample-weighted mean. A round is the unit of exactly-once (its
step id, in the trainer's step log and the servers' update logs), of checkpoints (taken between
rounds: the parameters, the outer optimizer's state; workers keep nothing across rounds but top-k
residuals) and of recovery: a worker lost mid-round has its shard's inner steps re-run from the
round's parameters on a live worker. Re-running rather than re-weighting the survivors keeps the
round's result the fault-free one (re-weighting would change it, and make it depend on when the
worker was lost), at the price of at most one more round of that shard's compute; a round applied
once is never applied again, whatever is re-sent.

No shared-memory lane: a round moves parameters once and deltas once, so there is little to save.
"""

from __future__ import annotations


import numpy as np

from gradserve_services.errors import InvalidArgument

from .config import StepResult, TrainerConfig
from .local_round import round_tasks
from .parameter_shards import ParameterShards
from .shard_runner import Failures, ShardInputs, ShardRunner
from .step_report import Clock, global_norm_of, step_result
from .steplog import update_key

__all__ = ["LocalRounds", "check_round_batch"]


class LocalRounds:
    def __init__(self, backend, config: TrainerConfig, runner: ShardRunner, shards: ParameterShards):
        self._backend = backend
        self._config = config
        self._runner = runner
        self._shards = shards

    def run(self, step: int, x, y, *, steps_run: int, num_workers: int) -> StepResult:
        check_round_batch(x, self._config.local_steps)
        shards, key, clock = self._shards, update_key(step), Clock()
        planned = round_tasks(self._config, shards.table, shards.partition, x.shape[0], num_workers,
                              steps_run)
        batches = [self._rows(x, y, rows) for _, rows in planned]
        clock.mark("put")
        calls = [self._runner.dispatch(position, task, ShardInputs(shards.published, lambda batch=batch: batch))
                 for position, ((task, _), batch) in enumerate(zip(planned, batches))]
        failures = Failures()
        stats = self._runner.gather(calls, failures, num_workers)
        clock.mark("gathered")
        count = sum(s["count"] for s in stats)
        deltas_per_shard = [[call.grads[k] for call in calls] for k in range(len(shards.partition))]
        norm = shards.agree(deltas_per_shard, count, shards.version, self._config.optimizer.clip_norm)
        applying = shards.apply(key, count, shards.version, norm, deltas_per_shard)
        reports = shards.settle(applying)  # refused: the round's parameters stay the workers' input
        clock.mark("applied")
        if norm is None:
            norm = global_norm_of(reports)
        result = step_result("local", stats, [reports[0]], clock, failures, grad_norm=norm,
                             positions=[call.position for call in calls])
        shards.version = result.version
        return result

    def _rows(self, x, y, rows: list[tuple[int, int]]) -> tuple:
        """The worker's rows, one after the other, as two object-store entries."""
        return (self._backend.put(np.concatenate([x[start:stop] for start, stop in rows])),
                self._backend.put(np.concatenate([y[start:stop] for start, stop in rows])))


def check_round_batch(x, local_steps: int) -> None:
    """A round's batch must hold `local_steps` inner batches of at least one row, as one matrix."""
    if not isinstance(x, np.ndarray):
        raise InvalidArgument("local consistency takes a plain feature matrix; named inputs are "
                              "for the other modes", "batch.x")
    if x.shape[0] < local_steps:
        raise InvalidArgument(f"a round of {x.shape[0]} rows cannot make {local_steps} inner "
                              "batches (config.local_steps)", "batch.x")
