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

A step begun before the one before it ended (`begin(after=...)`) gives its workers that update's
published futures as arguments; where they and the servers map one shared-memory area, it gives
them the parameter blocks by value instead, and each waits for that update's outcome on the
servers' update boards (update_board.py): no hop through this process before they start.

Where the workers push their gradients during backward instead (`_run_pushed`), the servers hold
the sums when the last bucket arrives; the same update is made from them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from gradserve_services.engine import Batch

from .config import DEFAULT_CALL_TIMEOUT_S, StepResult, TrainerConfig
from .gradient_push import pushed_part
from .parameter_shards import ParameterShards
from .pushed_updates import pushes_id
from .shard_runner import Failures, ShardCall, ShardInputs, ShardRunner
from .shared import SharedMemoryLane
from .signals import NoiseScale, add_products, noise_terms, shard_cosines
from .step_report import Clock, global_norm_of, step_result
from .step_tasks import shard_tasks
from .steplog import update_key
from .update_board import GIVEN_UP, PostedBoard, kept_board, new_ticket

__all__ = ["Begun", "SyncSteps"]


@dataclass
class Begun:
    """A sync step whose shards and update are submitted, not yet waited for (`SyncSteps.begin`)."""

    step: int
    clock: Clock
    calls: list[ShardCall]
    applying: list  # the update's (published, report) futures per server shard
    rows: int
    steps_run: int
    num_workers: int
    computed_on: int  # the version the update is computed on
    pull_figures: dict  # the table lane's figures of the rows pulled for it
    resubmitted: bool = False  # a lost shard was re-run and the update submitted again
    ticket: int = 0  # its update's, posted on the servers' update boards (0: none)
    follows: int = 0  # the ticket of the update before it its workers wait for on the boards


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
        self._batch_block = 0  # which of the two batch blocks the last step wrote
        self._given_up: PostedBoard | None = None  # the updates this trainer gave up waiting on

    def run(self, step: int, x, y, *, steps_run: int, num_workers: int) -> StepResult:
        if self._pushes_gradients(num_workers):
            return self._run_pushed(step, x, y, steps_run, num_workers)
        return self.end(self.begin(step, x, y, steps_run=steps_run, num_workers=num_workers))

    def begins_ahead(self, num_workers: int) -> bool:
        """Whether a step can be begun before the one before it ended (`begin(after=...)`): where
        the gradients are returned when done and the model has no tables (whose rows are pulled
        before a step, from what the servers hold then)."""
        return self._shards.lane is None and not self._pushes_gradients(num_workers)

    def begin(self, step: int, x, y, *, steps_run: int, num_workers: int, after: Begun | None = None) -> Begun:
        """Submit the step's shards and its update, waiting for none of it. `after`: the step
        begun just before, not yet ended: this one's workers are then given that update's
        published parameters as arguments (Ray runs them the moment it is applied), and this
        update is computed on the version that one makes."""
        shards, clock = self._shards, Clock()
        published, computed_on = (shards.published, shards.version) if after is None else \
            ([output[0] for output in after.applying], after.computed_on + 1)
        follows = None if after is None else self._follows(after)
        inputs, tasks, rows = self._prepare(clock, x, y, published, steps_run, num_workers, follows)
        pulls, pull_figures = ([()] * len(tasks), {}) if shards.lane is None else \
            shards.lane.prepare(self._backend, shards.servers, shards.table, x, tasks)  # table_lane.py
        calls = [self._runner.dispatch(position, task, inputs, rows=pulls[position])
                 for position, task in enumerate(tasks)]
        begun = Begun(step, clock, calls, [], rows, steps_run, num_workers, computed_on, pull_figures,
                      follows=0 if follows is None else after.ticket)
        begun.applying = self._update(begun)
        return begun

    def _follows(self, after: Begun) -> tuple[list, dict] | None:
        """How the workers of a step begun after `after` wait for its update without Ray
        (update_board.py): `(the parameter blocks, the spec)`; None where the servers post no
        outcomes or this trainer has no board to give a step up on (they wait through Ray)."""
        boards = self._shards.boards
        if not after.ticket or boards is None or self._given_up_board() is None:
            return None
        timeout_s = self._config.call_timeout_s
        return ([(None, block) for _, block in boards],
                {"ticket": after.ticket, "boards": [board for board, _ in boards],
                 "given_up": self._given_up.ref, "timeout_s": DEFAULT_CALL_TIMEOUT_S if timeout_s is None else timeout_s})

    def _given_up_board(self) -> PostedBoard | None:
        """This trainer's board of updates it gave up waiting on (made once; None without a lane
        or room)."""
        if self._given_up is None and self._shared_memory is not None:
            self._given_up = kept_board(self._shared_memory, f"{self._shards.table}-given-up")
        return self._given_up

    def end(self, begun: Begun) -> StepResult:
        """Wait for a begun step: its shards (a lost one re-run and the update then submitted
        again: `begun.resubmitted`), then its update's reports."""
        shards, clock, calls = self._shards, begun.clock, begun.calls
        failures = Failures()
        try:
            stats = self._runner.gather(calls, failures, begun.num_workers)
        except BaseException:  # a refused shard (non-finite loss) or workers lost too often
            shards.discard_update(begun.applying)
            raise
        clock.mark("gathered")
        if failures.reruns:  # it failed on a lost gradient: submitted again, with the re-runs'
            shards.discard_update(begun.applying)
            begun.applying, begun.resubmitted = self._update(begun), True
        reports = shards.settle(begun.applying)
        clock.mark("applied")
        result = step_result("sync", stats, [reports[0]], clock, failures, grad_norm=_norm(reports),
                             positions=[call.position for call in calls])
        return self._finish(result, stats, reports, begun.pull_figures)

    def abandon(self, begun: Begun) -> None:
        """Forget a begun step that will not be ended (the one before it failed, so this one's
        shards, which wait for that update's parameters, fail too): its futures read as handled."""
        if begun.follows:  # its workers wait on the boards: tell them the update is not coming
            self._given_up.post(begun.follows, GIVEN_UP, 0)
        self._shards.discard_update(begun.applying)
        self._shards.discard([future for call in begun.calls for future in (*call.grads, call.stats)])

    def _prepare(self, clock: Clock, x, y, published: list, steps_run: int, num_workers: int,
                 follows: tuple | None = None):
        """`(inputs, tasks, rows)` of a step: the batch put where the workers read it."""
        shards = self._shards
        rows = x.rows if isinstance(x, Batch) else x.shape[0]
        inputs = self._inputs(x, y, published, follows)
        inputs.prepare(self._runner.shares_memory(num_workers))
        clock.mark("put")
        tasks = shard_tasks(self._config, shards.table, shards.partition, rows, num_workers,
                            steps_run, self._shared_memory is not None)
        return inputs, tasks, rows

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

    def _run_pushed(self, step: int, x, y, steps_run: int, num_workers: int) -> StepResult:
        """The step with gradients pushed during backward (gradient_push.py, pushed_updates.py):
        each server sums a bucket the moment every shard pushed it; one server applies when the
        last bucket is in; several check and apply as on the other path, from the sums they hold,
        each server's check waiting for its sums."""
        shards, key, clock = self._shards, update_key(step), Clock()
        inputs, tasks, rows = self._prepare(clock, x, y, shards.published, steps_run, num_workers)
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

    def _update(self, begun: Begun) -> list:
        """The update submitted with the workers' gradient futures as arguments: it starts the
        moment the last gradient exists (ParameterShards.update), without a round trip here."""
        shards, calls = self._shards, begun.calls
        # a ticket where a step begun after this one could wait for its outcome on the boards
        begun.ticket = new_ticket() if self._shared_memory is not None else 0
        return shards.update(update_key(begun.step), self._counts([call.task for call in calls], begun.steps_run),
                             begun.rows, begun.computed_on, self._config.optimizer.clip_norm,
                             _grads_per_shard(calls, len(shards.partition)), ticket=begun.ticket)

    def _inputs(self, x, y, published: list, follows: tuple | None = None) -> ShardInputs:
        """The step's inputs: the batch as one block for the workers that map shared memory
        (arrays only), through the object store for the others, who also get the servers to ask
        for copies of the parameters published as blocks."""
        backend, lane, shards = self._backend, self._shared_memory, self._shards
        shared_batch = None
        if lane is not None and isinstance(x, np.ndarray):
            # two batch blocks, taken in turn: a step begun ahead writes its batch while the
            # workers of the one before it may still read theirs
            self._batch_block ^= 1
            name = f"{shards.table}-batch-{self._batch_block}"

            def shared_batch():
                return lane.put(name, {"x": x, "y": y})
        return ShardInputs(published, lambda: (backend.put(x), backend.put(y)),
                           shared_batch=shared_batch, servers=None if lane is None else shards.servers,
                           follows=follows)

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
