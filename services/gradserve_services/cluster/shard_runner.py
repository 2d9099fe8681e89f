"""Run one batch's shards on the worker pool: dispatch each to its worker, gather the small stats,
and re-run a shard whose worker was lost on a live one (the pool replaces the dead actor).

Shared by the trainer's steps and the stateless `Executor.compute_gradients`: a shard's inputs (its
task, the parameter references, the batch) are kept with its call, so a re-run is the same call
on another worker and its result is the fault-free one. Each worker gets the inputs in the form its
lane takes (`ShardInputs.batch_for`), from what the backend recorded when the worker started.

A shard's call may take `timeout_s` from its dispatch (None: no bound). A worker that has not
answered by then is stuck, not dead (a dead one is reported at once): it is stopped and replaced,
and the shard re-run elsewhere, exactly as for a death.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from gradserve_services.errors import Unavailable

from .backend import Backend, CallTimedOut, seconds_left
from .shared import BlockRef

__all__ = ["ShardInputs", "ShardCall", "ShardRunner", "Failures", "MAX_SHARD_ATTEMPTS"]

# How many times one shard may be re-run after losing its worker before the step gives up.
MAX_SHARD_ATTEMPTS = 4


class ShardInputs:
    """What every shard of one batch reads: the parameter references (one per server shard), the
    batch, a tangent. The batch goes as one shared-memory block to a worker that maps the area
    (`shared_batch()` writes it; None where there is no room) and through the object store to any
    other (`store_batch()` puts x and y); each form is made once, when a worker first needs it.
    `servers`, where the parameters are published as blocks, let a worker without a lane ask for
    copies."""

    def __init__(self, params: list, store_batch: Callable[[], tuple], *,
                 shared_batch: Callable[[], BlockRef | None] | None = None, tangent: list | None = None,
                 servers: list | None = None, follows: tuple[list, dict] | None = None):
        self.params = list(params)
        # `(snapshots, spec)` of a step begun ahead on one machine: what a worker that maps the
        # area is given instead of `params`, the parameter blocks by value, and how it waits for
        # the update before it (`task["follows"]`, update_board.py)
        self.follows = follows
        self.tangent = tangent
        self._servers = servers
        self._store_batch, self._shared_batch = store_batch, shared_batch
        self._by_store: tuple | None = None
        self._block: list = []  # [] until written, then [BlockRef or None]

    def prepare(self, shares_memory: list[bool]) -> None:
        """Make now the forms these workers will take (so the step's put phase times them)."""
        for shares in set(shares_memory):
            self.batch_for(shares)

    def batch_for(self, shares_memory: bool) -> tuple:
        """`(x_ref, y_ref)`, or `(block, None)` for a worker that maps the block."""
        if shares_memory and self._shared_batch is not None:
            if not self._block:
                self._block.append(self._shared_batch())
            if self._block[0] is not None:
                return self._block[0], None
        if self._by_store is None:
            self._by_store = self._store_batch()
        return self._by_store

    def compute_call(self, shares_memory: bool) -> tuple[str, list]:
        """`(worker method, its parameter arguments)` for a worker that does (or does not) map the
        area: where the servers publish blocks, a worker that maps them is given the snapshots
        themselves, `(version, BlockRef)` of a few bytes each, which Ray resolves before the call
        (`compute_given`); any other is given their references, and fetches what they point at
        once per version (`compute`). A step begun ahead on one machine gives the former its
        parameter blocks by value instead: it waits for the update before it on the servers'
        boards, and Ray has nothing to wait for."""
        if shares_memory and self._servers is not None:
            given = self.params if self.follows is None else self.follows[0]
            return "compute_given", [len(given), *given]
        return "compute", [self.params]

    def task_for(self, task: dict, shares_memory: bool) -> dict:
        if self._servers is None:
            return task
        if not shares_memory:
            return {**task, "servers": self._servers}
        return task if self.follows is None else {**task, "follows": self.follows[1]}


@dataclass
class ShardCall:
    """One shard's `compute` in flight: what it was given (to re-run it) and its futures."""

    position: int  # worker pool position running it
    task: dict
    inputs: ShardInputs
    grads: list  # one gradient-part future per parameter-server shard
    stats: object  # future of the small stats dict
    rows: list = field(default_factory=list)  # pulled table rows, one future per server shard
    deadline: float | None = None  # time.monotonic() by which it must answer; None: no bound


@dataclass
class Failures:
    workers_lost: int = 0  # workers replaced
    reruns: int = 0  # shards computed again


class ShardRunner:
    """`check_inputs(error)`, called when a shard failed although its worker did not die, raises
    when re-running cannot help: what the shard read is gone with its owner (a parameter server)."""

    def __init__(self, backend: Backend, check_inputs: Callable[[BaseException], None] | None = None,
                 timeout_s: float | None = None):
        self._backend = backend
        self._check_inputs = check_inputs
        self.timeout_s = timeout_s

    def shares_memory(self, workers: int) -> list[bool]:
        """Per pool position `< workers`: whether that worker maps the shared-memory area."""
        return [self._backend.shares_memory(worker) for worker in self._backend.workers(workers)]

    def dispatch(self, position: int, task: dict, inputs: ShardInputs, rows: list = ()) -> ShardCall:
        worker = self._backend.workers(position + 1)[position]
        shares = self._backend.shares_memory(worker)
        method, params = inputs.compute_call(shares)
        futures = self._backend.submit(worker, method, inputs.task_for(task, shares), *params,
                                       *inputs.batch_for(shares), inputs.tangent, *rows,
                                       num_returns=len(task["partition"]) + 1)
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        return ShardCall(position, task, inputs, futures[:-1], futures[-1], list(rows), deadline)

    def stats_of(self, call: ShardCall) -> dict:
        """The call's stats, waited for until its deadline (`CallTimedOut` after it)."""
        try:
            return self._backend.get(call.stats, timeout_s=seconds_left(call.deadline))
        except CallTimedOut:
            raise CallTimedOut(f"shard {call.task['start']}:{call.task['stop']}: its worker did not answer "
                               f"within {self.timeout_s:g} s", "workers") from None

    def next_done(self, calls: list[ShardCall]) -> int:
        """Index of a call that answered, waiting at most until the earliest deadline; where none
        answered by then, the index of the one whose deadline passed (`stats_of` it times out)."""
        deadlines = [call.deadline for call in calls if call.deadline is not None]
        first = min(deadlines, default=None)
        index = self._backend.wait_one([call.stats for call in calls], timeout_s=seconds_left(first))
        return index if index is not None else [call.deadline for call in calls].index(first)

    def gather(self, calls: list[ShardCall], failures: Failures, workers: int) -> list[dict]:
        """Every shard's stats, in shard order, over a pool of `workers`; `calls` is updated in
        place with the re-runs."""
        stats: list = [None] * len(calls)
        while any(s is None for s in stats):
            for index, call in enumerate(calls):
                if stats[index] is not None:
                    continue
                try:
                    stats[index] = self.stats_of(call)
                except Exception as error:  # noqa: BLE001 - classified by the backend
                    healthy = [c.position for c, s in zip(calls, stats) if s is not None]
                    calls[index] = self.rerun(call, error, healthy, failures, workers)
        return stats

    def rerun(self, call: ShardCall, error: BaseException, healthy: list[int],
              failures: Failures, workers: int) -> ShardCall:
        """Replace the lost worker and run the shard again: on a worker known to be alive if there
        is one (it is warm), else on another pool member, else on the replacement. A worker that
        did not answer in time (`CallTimedOut`) counts as lost, and replacing it stops it."""
        backend = self._backend
        stuck = isinstance(error, CallTimedOut)
        if not stuck and not backend.is_lost(error):
            raise backend.cause(error) from None
        lost = backend.workers(workers)[call.position]
        if not stuck and not backend.died(error, lost) and self._check_inputs is not None:
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
        return self.dispatch(position, {**call.task, "attempt": attempts}, call.inputs, call.rows)
