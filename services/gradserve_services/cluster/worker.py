"""`GradientWorker`: forward + backward on one shard of a batch, in micro-batches.

A plain class; `remote.py` makes it a Ray actor. It returns gradient SUMS, loss sums and sample
counts (never averages) so any number of uneven shards aggregates exactly, plus its timings.
Parameters arrive as a list of references, one per parameter-server shard, each resolving to a
`(version, params)` snapshot; the worker fetches them only when the references change, so a version
crosses the object store once per worker and is used in place (zero-copy, read-only).

Where it runs is settled when it starts: its shared-memory lane (shared.py) where it maps the
executor's area, else none (every block a server publishes is then asked for as a copy), and the
`ActorCalls` it reaches other actors with (none in the caller's own process, where arguments
arrive resolved). `metadata()` reports both for the backend to record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections import OrderedDict

import numpy as np

from gradserve_services.engine import Batch, Model, dense_gradients
from gradserve_services.errors import FailedPrecondition
from gradserve_services.optim import all_finite

from .compression import ErrorFeedback, encode
from .gradient_push import GradientPush, pushed_part
from .local_round import run_task_round
from .powersgd import WorkerFactors, encode_p
from .shared import BlockRef, SharedMemoryLane
from .update_board import Doorbell, read_board, wait_for_update
from .worker_rows import row_pushes, table_parameters

__all__ = ["GradientWorker", "ModelCache", "limit_blas_threads", "spec_key"]

# Bounded caches: a worker serves every session of an executor.
MAX_CACHED_MODELS = 8
MAX_CACHED_TABLES = 16


def limit_blas_threads() -> bool:
    """One BLAS/OpenMP thread in this process (a worker is one core); False if threadpoolctl is
    missing, in which case the OMP/OPENBLAS/MKL_NUM_THREADS environment set by `remote.py` rules."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(limits=1)
    return True


def spec_key(spec) -> str:
    """A canonical string for a spec dict, so equal specs share one cached `Model`."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


class ModelCache:
    """`Model`s by spec, the most recently used few kept (validation and topological sort once)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._models: OrderedDict[str, Model] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec) -> Model:
        key = spec_key(spec)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = Model(spec)
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return model


class GradientWorker:
    def __init__(self, limit_threads: bool = True, *, shared_area: tuple[str, str] | None = None, calls=None):
        if limit_threads:
            limit_blas_threads()
        self._models = ModelCache(MAX_CACHED_MODELS)
        # table -> (the parameter references, version, params)
        self._params: OrderedDict[str, tuple] = OrderedDict()
        self._feedback: dict[str, ErrorFeedback] = {}
        self._power: dict[tuple, WorkerFactors] = {}  # (table, shard slot) -> PowerSGD state
        self._lane = SharedMemoryLane.joined(shared_area)
        self._bell = Doorbell.bound(None if self._lane is None else self._lane.area[0])
        self._calls = calls

    def pid(self) -> int:
        return os.getpid()

    def metadata(self) -> dict:
        """Where this worker runs, recorded by the backend when it starts."""
        return {"pid": os.getpid(), "node_id": "local" if self._calls is None else self._calls.node_id(),
                "shared_memory": self._lane is not None}

    def forget(self, table: str) -> None:
        """Drop what this worker keeps for a closed trainer (parameters, top-k residuals, blocks)."""
        self._params.pop(table, None)
        self._feedback.pop(table, None)
        for key in [key for key in self._power if key[0] == table]:
            del self._power[key]
        if self._lane is not None:
            self._lane.forget(table)

    def compute(self, task: dict, params_refs: list, x, y, tangent_refs=None, *pulled_rows):
        """Gradient sum (or JVP) of rows `task["start"]:task["stop"]` of the batch.

        Returns one encoded gradient part per entry of `task["partition"]` followed by a stats dict:
        loss_sum, count, version (of the parameters used), jvp_sum (with a tangent), bytes_raw,
        bytes_sent, fetch_ms, compute_ms. With `task["tables"]`, `pulled_rows`
        are the servers' answers for the rows this shard reads (worker_rows.py); each part then
        carries its server's share of the table gradients as `part["rows"]`, and the stats count
        rows_pushed and bytes_pushed.
        """
        started = time.perf_counter()
        if isinstance(x, BlockRef):  # the batch in shared memory: sent only to a worker with a lane
            batch = self._lane.read(x)
            x, y = batch["x"], batch["y"]
        version, params = self._parameters(task["table"], params_refs, task.get("servers"))
        tables = task.get("tables")
        if tables is not None:
            params = {**params, **table_parameters(tables, pulled_rows)}
        fetched = time.perf_counter()
        model = self._model(task["spec"])
        start, stop = task["start"], task["stop"]
        options = {"micro_batch_size": task.get("micro_batch_size"), "seed": task.get("seed", 0),
                   "sample_offset": start}
        stats = {"count": stop - start, "version": version, "jvp_sum": None}
        if isinstance(x, Batch):  # named inputs: the batch slices itself (bags by their offsets)
            shard_x, shard_y = x.slice(model.xp, start, stop), y[start:stop]
        else:
            shard_x, shard_y = x[start:stop], y[start:stop]
        parts = [None] * len(task["partition"])
        bytes_raw = bytes_sent = 0
        if tangent_refs is not None:
            _, tangent = _merge(self._fetch(tangent_refs))
            mean_loss, derivative = model.jvp(params, tangent, shard_x, shard_y, **options)
            stats["loss_sum"] = mean_loss * (stop - start)
            stats["jvp_sum"] = derivative * (stop - start)
            computed = time.perf_counter()
        else:
            # compressed parts are small and are what the server must decode: they travel as is
            shared = self._lane is not None and task.get("shared_memory", False) and \
                task.get("compression", "none") == "none"
            push = blocks = None
            if "local" in task:  # a round: the pseudo-gradient of this worker's inner steps
                result = run_task_round(model, params, x, y, task)
            else:
                push = GradientPush(self._calls, self._lane, task) if "push" in task else None
                blocks = self._gradient_blocks(task, params) if shared and push is None and tables is None else None
                result = model.loss_and_grad_sum(
                    params, shard_x, shard_y, **options, on_ready=None if push is None else push.ready,
                    out=None if blocks is None else {n: v for _, views in blocks for n, v in views.items()})
                if tables is None and task.get("finite_only"):  # a trainer's tables kept whole
                    result = dataclasses.replace(result, grad_sum=dense_gradients(result.grad_sum))
            stats["loss_sum"], stats["count"] = result.loss_sum, result.count
            computed = time.perf_counter()
            feedback = self._feedback.setdefault(task["table"], ErrorFeedback()) \
                if task.get("compression") == "topk" else None
            if task.get("finite_only"):
                _refuse_non_finite(result, start, stop,  # what feeds a residual must be finite
                                   gradients_too=feedback is not None or "powersgd" in task)
            if push is not None:  # the servers hold the sums already, but for the last buckets
                push.finish(result.grad_sum)
                parts = [pushed_part(task["push"]["key"])] * len(task["partition"])
                bytes_raw = bytes_sent = push.bytes_pushed
            pushes = None
            if tables is not None:
                pushes, pushed, pushed_bytes = row_pushes(tables, result.grad_sum)
                stats.update(rows_pushed=pushed, bytes_pushed=pushed_bytes)
            for index, names in enumerate(task["partition"] if push is None else ()):
                if blocks is not None:  # summed in place: the server reads them where they lie
                    part = _filled_part(blocks[index], {n: result.grad_sum[n] for n in names})
                else:
                    part = self._shared_part(task, index, {n: result.grad_sum[n] for n in names}) \
                        if shared and names else None  # the server reads the sum where this worker wrote it
                if part is not None:
                    parts[index] = part
                    raw = sent = sum(result.grad_sum[n].nbytes for n in names)
                elif "powersgd" in task:  # phase one of PowerSGD: factors P_i (powersgd.py)
                    parts[index], raw, sent = encode_p(self._factors(task["table"], task["batch_shard"]),
                                                       result.grad_sum, names, task["powersgd"])
                else:
                    parts[index], raw, sent = encode(
                        result.grad_sum, names, result.count, task.get("compression", "none"),
                        feedback=feedback, topk_fraction=task.get("topk_fraction", 0.01))
                bytes_raw, bytes_sent = bytes_raw + raw, bytes_sent + sent
                if pushes is not None:
                    parts[index]["rows"] = pushes[index]
        stats.update(bytes_raw=bytes_raw, bytes_sent=bytes_sent,
                     fetch_ms=(fetched - started) * 1e3, compute_ms=(computed - fetched) * 1e3)
        return (*parts, stats)

    def compute_given(self, task: dict, snapshots: int, *args):
        """`compute` given the servers' published snapshots themselves: the first `snapshots` of
        `args` (`(version, BlockRef)` each, resolved by Ray before this call), so nothing is fetched
        before the pass; the rest are `compute`'s arguments after `params_refs`. With
        `task["follows"]` (a step begun ahead on one machine), the snapshots name the blocks only:
        the update before this step is waited for on the servers' update boards
        (update_board.py), which give the version."""
        given = args[:snapshots]
        follows = task.get("follows")
        if follows is not None:  # a step begun ahead: the update before it is waited for here
            versions = wait_for_update([read_board(self._lane, ref) for ref in follows["boards"]],
                                       read_board(self._lane, follows["given_up"]),
                                       follows["ticket"], self._bell, follows["timeout_s"])
            given = [(version, block) for version, (_, block) in zip(versions, given)]
        return self.compute(task, _Given(given), *args[snapshots:])

    def powersgd_q(self, table: str, slot: int, p_hats: dict) -> dict:
        """Phase two of PowerSGD for shard `slot` of the step this worker computed: `{name: Q_i}`
        against the servers' orthonormal P̂ (the residuals follow the shard slot)."""
        return self._factors(table, slot).q_factors(p_hats)

    def _factors(self, table: str, slot: int) -> WorkerFactors:
        return self._power.setdefault((table, slot), WorkerFactors())

    def _model(self, spec) -> Model:
        return self._models.get(spec)

    def _shared_part(self, task: dict, index: int, grads: dict) -> dict | None:
        ref = self._lane.put(_gradient_block_name(task, index), grads)
        return None if ref is None else {"kind": "shared", "block": ref}  # None: no room, by store

    def _gradient_blocks(self, task: dict, params: dict) -> list | None:
        """Per server shard, the block `(ref, views)` this shard's plain dense gradient sums (sent
        as blocks) are accumulated in by the backward pass itself (no copy after it); None where a
        server shard holds no dense parameter or some block finds no room (then they are copied
        or sent by store)."""
        if any(not names for names in task["partition"]):
            return None
        blocks = [self._lane.kept(_gradient_block_name(task, index),
                                  {n: (params[n].dtype, params[n].shape) for n in names})
                  for index, names in enumerate(task["partition"])]
        return None if any(block is None for block in blocks) else blocks

    def _fetch(self, refs: list) -> list:
        """The snapshots `refs` point at (in the caller's process they arrive resolved)."""
        return list(refs) if self._calls is None else self._calls.get(list(refs))

    def _parameters(self, table: str, params_refs: list, servers=None):
        """The `(version, params)` the references point at (or the snapshots given, `_Given`), from
        cache while they are unchanged.
        A server's block this worker cannot map (it has no lane) is asked for as a copy from
        `servers`: in sync mode the block holds exactly that version until the next apply."""
        if self._calls is None:
            return _merge(params_refs)  # in-process snapshots: nothing to fetch, nothing to cache
        refs = tuple(params_refs)
        cached = self._params.get(table)
        if cached is not None and cached[0] == refs:
            self._params.move_to_end(table)
            return cached[1], cached[2]
        snapshots = list(refs) if isinstance(params_refs, _Given) else self._fetch(params_refs)
        unmapped = [index for index, (_, held) in enumerate(snapshots)
                    if isinstance(held, BlockRef) and self._lane is None]
        copies = self._calls.get([self._calls.submit(servers[index], "snapshot", table)[0]
                                  for index in unmapped])
        for index, copy in zip(unmapped, copies):
            snapshots[index] = copy
        version, params = _merge(snapshots, self._lane)
        self._params[table] = (refs, version, params)
        while len(self._params) > MAX_CACHED_TABLES:
            self._params.popitem(last=False)
        return version, params


class _Given(tuple):
    """Snapshots given to `compute_given` by value, where `compute` is otherwise given references."""


def _gradient_block_name(task: dict, index: int) -> str:
    # One block per (table, batch shard, server shard): a worker re-running another shard in the
    # same step writes a different block, never one the server may still read. Kept until the
    # trainer is closed (`forget`): a block of another trainer may still be waiting for its
    # server, so none is evicted here. Batch and server shards bound their number.
    return f"{task['table']}-grad-{os.getpid()}-{task.get('batch_shard', 0)}-{index}"


def _filled_part(block: tuple, grads: dict) -> dict:
    """The part for a block the sums were accumulated in; a sum held elsewhere (a parameter no
    pass reached: zeros) is copied in."""
    ref, views = block
    for name, grad in grads.items():
        if grad is not views[name]:
            np.copyto(views[name], grad, casting="no")
    return {"kind": "shared", "block": ref}


def _refuse_non_finite(result, start: int, stop: int, *, gradients_too: bool) -> None:
    """A training shard whose loss (or gradient) overflowed from finite inputs is refused before
    anything is applied. Gradients are checked here only where top-k's error feedback would keep a
    non-finite residual; otherwise the parameter server checks them with the update."""
    if not math.isfinite(result.loss_sum):
        raise FailedPrecondition(f"the loss of batch rows {start}:{stop} is {result.loss_sum}, not "
                                 "finite: the model overflows on this batch; nothing was applied",
                                 "loss")
    for name, grad in result.grad_sum.items() if gradients_too else ():
        if not all_finite(grad):
            raise FailedPrecondition(f"the gradient of {name!r} is not finite: the model overflows "
                                     "on this batch; nothing was applied", f"gradients.{name}")


def _merge(snapshots: list, lane: SharedMemoryLane | None = None):
    """One `(version, params)` from every parameter-server shard's snapshot (a shard's block read
    in place through the lane)."""
    params = {}
    for _, shard_params in snapshots:
        params.update(lane.read(shard_params) if isinstance(shard_params, BlockRef) else shard_params)
    return snapshots[0][0], params
