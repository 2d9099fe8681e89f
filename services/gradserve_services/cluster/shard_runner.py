"""Run one batch's shards on the worker pool: dispatch each to its worker, gather the small stats,
and re-run a shard whose worker was lost on a live one (the pool replaces the dead actor).

Shared by the trainer's steps and the stateless `Executor.compute_gradients`: a shard's inputs (its
task, the parameter references, the batch) are kept with its call, so a re-run is the same call
on another worker and its result is the fault-free one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gradserve_services.errors import Unavailable

from .backend import Backend
from .worker import AreaNotVisible

__all__ = ["ShardCall", "ShardRunner", "Failures", "MAX_SHARD_ATTEMPTS"]

# How many times one shard may be re-run after losing its worker before the step gives up.
MAX_SHARD_ATTEMPTS = 4


@dataclass
class ShardCall:
    """One shard's `compute` in flight: what it was given (to re-run it) and its futures."""

    position: int  # worker pool position running it
    task: dict
    params: list  # references to the `(version, params)` snapshots, one per server shard
    batch: tuple  # (x_ref, y_ref), or (block_ref, None) for a batch in shared memory
    tangent: list | None
    grads: list  # one gradient-part future per parameter-server shard
    stats: object  # future of the small stats dict


@dataclass
class Failures:
    workers_lost: int = 0  # workers replaced
    reruns: int = 0  # shards computed again

    @property
    def none(self) -> bool:
        return self.workers_lost == 0 and self.reruns == 0


class ShardRunner:
    """`check_inputs(error)`, called when a shard failed although its worker did not die, raises
    when re-running cannot help: what the shard read is gone with its owner (a parameter server)."""

    def __init__(self, backend: Backend, check_inputs: Callable[[BaseException], None] | None = None):
        self._backend = backend
        self._check_inputs = check_inputs

    def dispatch(self, position: int, task: dict, params: list, batch: tuple,
                 tangent: list | None = None) -> ShardCall:
        worker = self._backend.workers(position + 1)[position]
        futures = self._backend.submit(worker, "compute", task, list(params), *batch, tangent,
                                       num_returns=len(task["partition"]) + 1)
        return ShardCall(position, task, list(params), batch, tangent, futures[:-1], futures[-1])

    def gather(self, calls: list[ShardCall], failures: Failures, workers: int,
               prepare_rerun: Callable[[ShardCall], ShardCall] | None = None) -> list[dict]:
        """Every shard's stats, in shard order, over a pool of `workers`; `calls` is updated in
        place with the re-runs. `prepare_rerun(call)` gives the call as a re-run may land anywhere
        (the batch by store)."""
        stats: list = [None] * len(calls)
        while any(s is None for s in stats):
            for index, call in enumerate(calls):
                if stats[index] is not None:
                    continue
                try:
                    stats[index] = self._backend.get(call.stats)
                except Exception as error:  # noqa: BLE001 - classified by the backend
                    if prepare_rerun is not None:
                        call = prepare_rerun(call)
                    if isinstance(self._backend.cause(error), AreaNotVisible):
                        failures.reruns += 1  # a re-run on the same worker, with the batch by store
                        calls[index] = self.dispatch(call.position, call.task, call.params,
                                                     call.batch, call.tangent)
                        continue
                    healthy = [c.position for c, s in zip(calls, stats) if s is not None]
                    calls[index] = self.rerun(call, error, healthy, failures, workers)
        return stats

    def rerun(self, call: ShardCall, error: BaseException, healthy: list[int],
              failures: Failures, workers: int) -> ShardCall:
        """Replace the lost worker and run the shard again: on a worker known to be alive if there
        is one (it is warm), else on another pool member, else on the replacement."""
        backend = self._backend
        if not backend.is_lost(error):
            raise backend.cause(error) from None
        lost = backend.workers(workers)[call.position]
        if not backend.died(error, lost) and self._check_inputs is not None:
            # A shard also fails when the parameters it reads are gone with their server: that is
            # no worker's fault, and re-running cannot help.
            # (Not asked when the worker itself died: the question waits in the server's queue
            # behind the step's early apply, i.e. until every other shard is done.)
            self._check_inputs(error)
        attempts = call.task.get("attempt", 0) + 1
        if attempts >= MAX_SHARD_ATTEMPTS:
            raise Unavailable(f"shard {call.task['start']}:{call.task['stop']} lost its worker "
                              f"{attempts} times: {error}", "workers")
        replaced = backend.replace_worker(call.position, lost) is not lost
        failures.workers_lost += int(replaced)
        failures.reruns += 1
        others = [p for p in range(workers) if p != call.position]
        candidates = healthy or others or [call.position]
        position = candidates[attempts % len(candidates)]
        return self.dispatch(position, {**call.task, "attempt": attempts}, call.params, call.batch,
                             call.tangent)
