"""The sync step with PowerSGD compression (powersgd.py has the math): two phases through this
coordinator, which runs on the parameter servers' node, then one update.

1. Every worker computes its shard's gradient and returns, per server shard, its factors
   `P_i = M_i Q` of the compressed matrices plus the other parameters' gradient sums (one part).
2. Here: `P̂ = orthonormal(sum_i P_i)` per matrix, sent to every worker, which answers
   `Q_i = M_i.T P̂` (and keeps its residual); the matrices' update is `P̂ (sum_i Q_i).T`.
3. Each server shard applies one part: the matrices' update and the other parameters' gradient
   sums (added here), as sums over the step's rows, through the optimizer like any gradient.

The sums of P and of Q are exact, so the update is that of one worker holding the whole batch: the
number of workers changes nothing but summation order (residuals stay with the pool position that
computed them; a worker replaced takes its residual along). The next step's Q is this step's
`sum_i Q_i` (warm start). A worker lost in phase one has its shard re-run (ShardRunner); a worker
lost between the phases fails the step with Unavailable and applies nothing (its M_i went with
it; the step id may be sent again). A trainer restored from a checkpoint starts PowerSGD afresh
(the initial Q, no residuals): they are compression state, not training state.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from gradserve_services.errors import Unavailable

from .config import StepResult, TrainerConfig
from .parameter_shards import ParameterShards
from .powersgd import check_rank, compressed_shapes, initial_q, orthonormal
from .shard_runner import Failures, ShardInputs, ShardRunner
from .step_report import Clock, step_result
from .step_tasks import shard_tasks
from .steplog import update_key

__all__ = ["PowerSGDSteps"]


class PowerSGDSteps:
    def __init__(self, backend, config: TrainerConfig, shapes: dict, dtype, runner: ShardRunner,
                 shards: ParameterShards, lane):
        check_rank(config.powersgd_rank, shapes, "config.powersgd_rank")
        self._backend = backend
        self._config = config
        self._runner = runner
        self._shards = shards
        self._lane = lane  # not None: the servers publish parameters as shared blocks
        self._matrices = compressed_shapes(shapes)
        rank = config.powersgd_rank
        self._qs = {name: initial_q(config.seed, name, shape, rank, dtype)
                    for name, shape in self._matrices.items()}

    def run(self, step: int, x, y, *, steps_run: int, num_workers: int) -> StepResult:
        shards, key, clock, backend = self._shards, update_key(step), Clock(), self._backend
        total = x.shape[0]
        batch = (backend.put(x), backend.put(y))
        # the factors travel by store; a worker that cannot map the published blocks asks for copies
        inputs = ShardInputs(shards.published, lambda: batch,
                             servers=None if self._lane is None else shards.servers)
        clock.mark("put")
        tasks = shard_tasks(self._config, shards.table, shards.partition, total, num_workers, steps_run)
        for task in tasks:
            task["powersgd"] = {"total": total, "qs": self._qs}
        calls = [self._runner.dispatch(position, task, inputs) for position, task in enumerate(tasks)]
        failures = Failures()
        stats = self._runner.gather(calls, failures, num_workers)
        parts = backend.get([part for call in calls for part in call.grads])
        p_hats = {name: orthonormal(sum(part["p"][name] for part in parts if name in part["p"]))
                  for name in self._matrices}
        p_hats_ref = backend.put(p_hats)
        answers = [backend.submit(backend.workers(call.position + 1)[call.position], "powersgd_q",
                                  shards.table, call.task["batch_shard"], p_hats_ref)[0]
                   for call in calls]
        try:
            q_parts = backend.get(answers, timeout_s=self._runner.timeout_s)
        except Exception as error:  # noqa: BLE001 - classified by the backend
            if backend.is_lost(error):
                raise Unavailable("a worker was lost between the two PowerSGD phases; nothing was "
                                  f"applied, resend the step ({error})", "workers") from None
            raise backend.cause(error) from None
        clock.mark("gathered")
        q_sums = {name: sum(q[name] for q in q_parts) for name in self._matrices}
        scale = np.dtype(next(iter(q_sums.values())).dtype).type(total) if q_sums else 1.0
        updates = {name: (p_hats[name] @ q_sums[name].T) * scale for name in self._matrices}
        for part in parts:  # the other parameters' gradient sums, summed here as well
            for name, grad_sum in part["dense"].items():
                updates[name] = updates[name] + grad_sum if name in updates else grad_sum
        grads_per_shard = [[backend.put({"kind": "dense", "grads": {n: updates[n] for n in names}})]
                           for names in shards.partition]
        norm = shards.agree(grads_per_shard, total, shards.version, self._config.optimizer.clip_norm)
        applying = shards.apply(key, total, shards.version, norm, grads_per_shard)
        try:
            reports = shards.get([output[1] for output in applying])
        except BaseException:  # refused: the last published parameters stay the workers' input
            shards.discard([output[0] for output in applying])
            raise
        shards.published = [output[0] for output in applying]
        self._qs = q_sums  # warm start, once the step was applied
        clock.mark("applied")
        if norm is None:
            norm = math.sqrt(sum(report["grad_norm"] ** 2 for report in reports))
        result = step_result("sync", stats, [reports[0]], clock, failures, grad_norm=norm,
                             positions=[call.position for call in calls])
        shards.version = result.version
        q_bytes = sum(q.nbytes for answer in q_parts for q in answer.values())
        return replace(result, bytes_compressed=result.bytes_compressed + q_bytes)
